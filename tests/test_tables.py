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


def two_roi_rows():
    """One subject-hemisphere: FFA-1 with untuned, cl and the cl:untuned comparison and retrieval; V1v untuned only;
    mTL-faces empty. Values as single_subject_rows writes them (CSV strings for V1v, as read back)."""
    ffa = {"subject": 1, "hemisphere": "lh", "roi": "FFA-1", "group": "Higher", "n_voxels": 40,
           "layer_untuned": "features.5", "layer_cl": "features.8",
           "mean_r_untuned": 0.2, "median_r_untuned": 0.25, "mean_r_untuned_ci_low": 0.15,
           "mean_r_untuned_ci_high": 0.24, "median_r_untuned_ci_low": 0.2, "median_r_untuned_ci_high": 0.3,
           "mean_r_cl": 0.3, "median_r_cl": 0.33, "mean_r_cl_ci_low": 0.25, "mean_r_cl_ci_high": 0.35,
           "median_r_cl_ci_low": 0.28, "median_r_cl_ci_high": 0.38, "median_challenge_score_cl": 41.0,
           "pct_improved_cl_vs_untuned": 70.0,
           "mean_diff_cl_vs_untuned": 0.1, "mean_diff_cl_vs_untuned_ci_low": 0.05,
           "mean_diff_cl_vs_untuned_ci_high": 0.15, "perm_p_mean_cl_vs_untuned": 0.002,
           "perm_p_mean_cl_vs_untuned_fdr": 0.004,
           "median_diff_cl_vs_untuned": 0.08, "median_diff_cl_vs_untuned_ci_low": 0.01,
           "median_diff_cl_vs_untuned_ci_high": 0.12, "perm_p_median_cl_vs_untuned": 0.03,
           "perm_p_median_cl_vs_untuned_fdr": 0.06,
           "top1_of_300_cl": 0.05, "top1_of_300_cl_ci_low": 0.03, "top1_of_300_cl_ci_high": 0.07,
           "chance_top1_of_300": 1 / 300}
    v1 = {"subject": "1", "hemisphere": "lh", "roi": "V1v", "group": "Early", "n_voxels": "12",
          "layer_untuned": "features.2", "layer_cl": "", "mean_r_untuned": "0.4", "median_r_untuned": "0.45",
          "mean_r_untuned_ci_low": "", "mean_r_untuned_ci_high": "", "median_r_untuned_ci_low": "0.4",
          "median_r_untuned_ci_high": "0.5", "mean_r_cl": "nan", "median_r_cl": "nan"}
    empty = {"subject": 1, "hemisphere": "lh", "roi": "mTL-faces", "group": "Higher", "n_voxels": 0,
             "note": "empty ROI"}
    return [ffa, v1, empty]


def test_tidy_rows_by_hand():
    tidy = results_utils.tidy_rows(two_roi_rows(), ["untuned", "cl"], [("cl", "untuned")])
    assert all(set(r) == set(results_utils.TIDY_COLUMNS) for r in tidy)
    keyed = {(r["roi"], r["kind"], r["feature_set"], r["statistic"]): r for r in tidy}
    assert len(keyed) == len(tidy)
    nan = np.nan
    expected = {   # (roi, kind, set, statistic): value, ci_low, ci_high, p, p_fdr, layer
        ("FFA-1", "set", "untuned", "mean_r"): (0.2, 0.15, 0.24, nan, nan, "features.5"),
        ("FFA-1", "set", "untuned", "median_r"): (0.25, 0.2, 0.3, nan, nan, "features.5"),
        ("FFA-1", "set", "cl", "mean_r"): (0.3, 0.25, 0.35, nan, nan, "features.8"),
        ("FFA-1", "set", "cl", "median_r"): (0.33, 0.28, 0.38, nan, nan, "features.8"),
        ("FFA-1", "set", "cl", "median_challenge_score"): (41.0, nan, nan, nan, nan, "features.8"),
        ("FFA-1", "comparison", "cl", "pct_improved"): (70.0, nan, nan, nan, nan, ""),
        ("FFA-1", "comparison", "cl", "mean_diff"): (0.1, 0.05, 0.15, 0.002, 0.004, ""),
        ("FFA-1", "comparison", "cl", "median_diff"): (0.08, 0.01, 0.12, 0.03, 0.06, ""),
        ("FFA-1", "retrieval", "cl", "top1_of_300"): (0.05, 0.03, 0.07, nan, nan, ""),
        ("FFA-1", "retrieval", "cl", "chance_top1_of_300"): (1 / 300, nan, nan, nan, nan, ""),
        ("V1v", "set", "untuned", "mean_r"): (0.4, nan, nan, nan, nan, "features.2"),
        ("V1v", "set", "untuned", "median_r"): (0.45, 0.4, 0.5, nan, nan, "features.2"),
    }
    assert set(keyed) == set(expected)   # no rows for the empty ROI nor for V1v's missing CL model
    for key, numbers in expected.items():
        row = keyed[key]
        got = tuple(row[c] for c in ("value", "ci_low", "ci_high", "p", "p_fdr"))
        np.testing.assert_allclose(got, numbers[:5], err_msg=str(key))
        assert row["layer"] == numbers[5] and isinstance(row["value"], float)
    ffa_diff = keyed[("FFA-1", "comparison", "cl", "median_diff")]
    assert (ffa_diff["baseline"], ffa_diff["comparison"], ffa_diff["roi_family"], ffa_diff["group"]) == (
        "untuned", "cl:untuned", "floc-faces", "Higher")
    v1 = keyed[("V1v", "set", "untuned", "median_r")]
    assert (v1["subject"], v1["n_voxels"], v1["roi_family"], v1["group"]) == (1, 12, "prf-visualrois", "Early")


def test_tidy_cross_subject_and_leave_one_subject_out_rows():
    matrix = np.array([[0.3, 0.2], [np.nan, 0.4]])
    tidy = results_utils.tidy_matrix_rows({"median_r": matrix}, [1, 2], method="cl", hemisphere="lh", roi="PPA")
    assert [(r["source"], r["target"], r["same_subject"], r["value"]) for r in tidy] == [
        (1, 1, True, 0.3), (1, 2, False, 0.2), (2, 2, True, 0.4)]
    assert tidy[0]["statistic"] == "median_r" and tidy[0]["roi_family"] == "floc-places"
    loso = [{"subject": 2, "hemisphere": "rh", "roi": "EBA", "feature_set": "pooled-cl",
             "layer_without_subject": "features.9", "mean_r_without_subject": 0.31, "median_r_without_subject": 0.3,
             "mean_r_untuned": 0.21, "median_r_untuned": 0.2, "pct_improved_without_subject_vs_untuned": 64.0}]
    rows = results_utils.tidy_loso_rows(loso)
    assert [(r["backbone"], r["statistic"], r["value"], r["layer"]) for r in rows] == [
        ("without_subject", "mean_r", 0.31, "features.9"), ("without_subject", "median_r", 0.3, "features.9"),
        ("untuned", "mean_r", 0.21, ""), ("untuned", "median_r", 0.2, ""),
        ("without_subject", "pct_improved_vs_untuned", 64.0, "features.9")]


def test_markdown_report_writes_cis_as_intervals():
    text = results_utils.markdown_report(two_roi_rows(), ["untuned", "cl"], [("cl", "untuned")])
    assert "| median_r_cl | median_r_cl 95% CI |" in text
    assert "[0.280, 0.380]" in text and "[0.010, 0.120]" in text and "[0.030, 0.070]" in text
    assert "ci95_" not in text


def test_markdown_report_shows_the_spread_over_training_seeds():
    rows = two_roi_rows()
    ffa = rows[0]
    per_seed = np.array([0.31, 0.35])  # each seed's model's median r; the difference to untuned per seed
    ffa.update({"n_seeds_cl": 2, "median_r_cl_seed_mean": per_seed.mean(), "median_r_cl_seed_sd": per_seed.std(ddof=1),
                "median_diff_cl_vs_untuned_seed_sd": (per_seed - 0.25).std(ddof=1)})
    text = results_utils.markdown_report(rows, ["untuned", "cl"], [("cl", "untuned")])
    seeds = text.split("### Training seeds")[1].split("###")[0]
    assert "| FFA-1 | 2 | 0.330 | 0.028 |" in seeds and "V1v" not in seeds   # SD of 0.31, 0.35 = 0.0283
    assert "median_diff_cl_vs_untuned_seed_sd" in text and "| 0.028 |" in text.split("### cl vs untuned")[1]
    assert "Training seeds" not in results_utils.markdown_report(two_roi_rows(), ["untuned", "cl"], [("cl", "untuned")])


def test_vertex_arrays_keep_every_family_and_take_the_first_family_per_vertex():
    """Two overlapping ROIs of different families (V1v: prf-visualrois, ventral: streams) and FFA-1 with a CL model
    only: each vertex takes its first family's fit for every set; NaN where nothing was fitted."""
    import results_maps
    n = 12
    roi_indices = {"V1v": np.array([0, 1, 2, 3]), "ventral": np.array([2, 3, 4, 5]), "FFA-1": np.array([8, 9])}
    voxel_r = {"V1v": np.array([[0.1, 0.2, 0.3, 0.4], [np.nan] * 4], dtype=np.float32),
               "ventral": np.array([[0.5, 0.6, 0.7, 0.8], [0.05, 0.06, 0.07, 0.08]], dtype=np.float32),
               "FFA-1": np.array([[0.9, 1.0], [0.95, 0.96]], dtype=np.float32)}
    layers = {"untuned": {"V1v": "b", "ventral": "c", "FFA-1": "a"}, "cl": {"ventral": "a", "FFA-1": "c"}}
    ceiling = np.full(n, 0.5)
    arrays = results_maps.vertex_arrays(voxel_r, roi_indices, ["untuned", "cl"], layers, ["a", "b", "c"], n, ceiling)
    nan = np.nan
    np.testing.assert_array_equal(arrays["r_untuned"], np.array([0.1, 0.2, 0.3, 0.4, 0.7, 0.8, nan, nan, 0.9, 1.0,
                                                                 nan, nan], dtype=np.float32))
    # vertices 2-3: V1v (first family) for every set, so CL (no V1v model) is NaN there, not ventral's value
    np.testing.assert_array_equal(arrays["r_cl"], np.array([nan, nan, nan, nan, 0.07, 0.08, nan, nan, 0.95, 0.96,
                                                            nan, nan], dtype=np.float32))
    names = list(arrays["rois"])
    assert list(arrays["roi"]) == [names.index(r) for r in ["V1v"] * 4 + ["ventral"] * 2] + [-1, -1] + \
        [names.index("FFA-1")] * 2 + [-1, -1]
    by_family = arrays["r_untuned_by_family"]
    families = list(arrays["families"])
    np.testing.assert_array_equal(by_family[families.index("streams"), 2:6], voxel_r["ventral"][0])
    np.testing.assert_array_equal(by_family[families.index("prf-visualrois"), :4], voxel_r["V1v"][0])
    assert np.isnan(by_family[families.index("floc-bodies")]).all()
    np.testing.assert_array_equal(arrays["layer_untuned"], [1, 1, 1, 1, 2, 2, nan, nan, 0, 0, nan, nan])
    np.testing.assert_array_equal(arrays["layer_cl"], [nan] * 4 + [0, 0, nan, nan, 2, 2, nan, nan])
    expected_score = np.where(np.isfinite(arrays["r_cl"]), 100 * np.minimum(arrays["r_cl"] ** 2 / 0.5, 1), np.nan)
    np.testing.assert_allclose(arrays["score_cl"], expected_score, rtol=1e-6)


def test_sidecars_live_in_meta_and_old_ones_are_still_read(tmp_path):
    import json

    import outputs
    table = tmp_path / "t.csv"
    outputs.save_csv(table, [{"a": 1}], {"k": 2})
    assert outputs.sidecar_path(table) == tmp_path / "meta" / "t.csv.json"
    assert outputs.read_sidecar(table)["options"] == {"k": 2}
    old = tmp_path / "old.npy"
    old.with_name("old.npy.meta.json").write_text(json.dumps({"options": {"k": 3}}))
    assert outputs.read_sidecar(old)["options"] == {"k": 3} and outputs.read_sidecar(tmp_path / "none") is None


def test_streamed_csv_appears_only_when_complete(tmp_path):
    import outputs
    path = tmp_path / "tidy.csv"
    with outputs.csv_stream(path, ["a", "b"]) as write:
        write([{"a": 1, "b": None}])
        write([{"a": 2.5, "b": "x"}])
        assert not path.exists()
    assert path.read_text() == "a,b\n1,\n2.5,x\n"
    with pytest.raises(RuntimeError), outputs.csv_stream(tmp_path / "broken.csv", ["a"]) as write:
        write([{"a": 1}])
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tidy.csv"]
