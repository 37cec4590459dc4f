"""results_utils tables on hand-made rows: group means, % improved, across-subject tests against scipy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import results_utils


def rows_for(subjects=(1, 2, 3, 4)):
    """Wide single-subject rows: two ROIs (one Early, one Higher) per subject, three feature sets."""
    rng = np.random.default_rng(0)
    rows = []
    for s in subjects:
        for roi, group in (("V1v", "Early"), ("FFA-1", "Higher")):
            row = {"subject": s, "hemisphere": "lh", "roi": roi, "group": group, "n_voxels": 10}
            for feature_set in ("untuned", "reg", "cl"):
                row[f"median_r_{feature_set}"] = float(rng.uniform(0.2, 0.6))
                row[f"mean_r_{feature_set}"] = float(rng.uniform(0.2, 0.6))
            row["pct_improved_cl_vs_untuned"] = float(rng.uniform(0, 100))
            rows.append(row)
    rows.append({"subject": 1, "hemisphere": "lh", "roi": "mTL-faces", "group": "Higher", "n_voxels": 0})
    return rows


def test_percent_improved_counts_strict_gains_over_finite_pairs():
    assert results_utils.percent_improved([0.2, 0.1, 0.5, np.nan], [0.1, 0.2, 0.5, 0.3]) == pytest.approx(100 / 3)
    assert np.isnan(results_utils.percent_improved([np.nan], [0.1]))


def test_group_table_by_hand():
    rows = rows_for()
    table = {t["group"]: t for t in results_utils.group_table(rows, ["untuned", "reg", "cl"], [("cl", "untuned")])}
    early = [r for r in rows if r.get("group") == "Early"]
    assert table["Early"]["median_r_cl"] == pytest.approx(np.mean([r["median_r_cl"] for r in early]))
    assert table["All"]["mean_r_reg"] == pytest.approx(np.mean([r["mean_r_reg"] for r in rows if r["n_voxels"]]))
    assert table["Higher"]["n_rois"] == 1 and table["Higher"]["n_subjects"] == 4   # the empty ROI is left out
    assert table["Early"]["pct_improved_cl_vs_untuned"] == pytest.approx(
        np.mean([r["pct_improved_cl_vs_untuned"] for r in early]))
    assert np.isnan(table["Anatomical"]["median_r_cl"])


def test_across_subject_tests_match_scipy_and_need_three_subjects():
    rows = rows_for()
    tests = results_utils.across_subject_table(rows, ["untuned", "reg", "cl"], [("cl", "untuned")])
    v1 = next(t for t in tests if t["roi"] == "V1v")
    a = [r["median_r_cl"] for r in rows if r["roi"] == "V1v"]
    b = [r["median_r_untuned"] for r in rows if r["roi"] == "V1v"]
    assert v1["n_subjects"] == 4 and v1["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert v1["p_w"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    everything = next(t for t in tests if t["roi"] == "group: All")   # each subject's mean over its ROIs
    a_all = [np.mean([r["median_r_cl"] for r in rows if r["subject"] == s and r["n_voxels"]]) for s in (1, 2, 3, 4)]
    b_all = [np.mean([r["median_r_untuned"] for r in rows if r["subject"] == s and r["n_voxels"]])
             for s in (1, 2, 3, 4)]
    assert everything["p_t"] == pytest.approx(stats.ttest_rel(a_all, b_all).pvalue)
    two = results_utils.across_subject_table(rows_for((1, 2)), ["untuned", "cl"], [("cl", "untuned")])
    assert all(t["n_subjects"] == 2 and np.isnan(t["p_t"]) for t in two)


def test_group_table_takes_pooled_sets_where_they_have_a_model():
    rows = rows_for()
    for r in rows:
        if r.get("roi") == "FFA-1":
            r["median_r_pooled-cl"], r["mean_r_pooled-cl"] = 0.5 + r["subject"] / 100, 0.4
    table = {t["group"]: t for t in results_utils.group_table(rows, ["untuned", "cl", "pooled-cl"], [])}
    assert table["All"]["n_rois"] == 2 and table["All"]["n_rois_pooled-cl"] == 1
    assert table["All"]["median_r_pooled-cl"] == pytest.approx(0.525)          # subjects 1-4 of FFA-1
    assert table["All"]["median_r_cl"] == pytest.approx(np.mean([r["median_r_cl"] for r in rows if r["n_voxels"]]))
