"""Every study figure rendered from synthetic tables of the full study (8 subjects x 2 hemispheres x 31 ROIs x
5 sets): saved width, font sizes, axis labels, and the plotted numbers against the tables."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.text import Text
from PIL import Image
from scipy import stats

import outputs
import plots
import plots_study
import utils

SETS = ("untuned", "reg", "cl", "pooled-reg", "pooled-cl")
COMPARISONS = (("cl", "untuned"), ("reg", "untuned"), ("cl", "reg"))
SUBJECTS = tuple(range(1, 9))
MAX_PX = 3000
GRID = tuple(10.0 ** k for k in range(1, 8))


def study_rows(seed: int = 0) -> list[dict]:
    """Wide single-subject rows as results_utils.single_subject_rows writes them, for the whole study: some ROIs
    empty for some subjects, pooled models missing for some ROIs, retrieval for the contrastive sets."""
    rng = np.random.default_rng(seed)
    rows = []
    base = {roi: 0.45 - 0.25 * (k / len(utils.ROI_NAMES)) for k, roi in enumerate(utils.ROI_NAMES)}
    for subject in SUBJECTS:
        for hemi in utils.HEMISPHERES:
            for roi in utils.ROI_NAMES:
                row = {"subject": subject, "hemisphere": hemi, "roi": roi, "group": utils.roi_group(roi),
                       "n_voxels": int(rng.integers(20, 3000)), "n_test_images": 984}
                if roi.startswith(("mTL", "aTL")) and rng.random() < 0.5:
                    rows.append({**row, "n_voxels": 0, "note": "empty ROI"})
                    continue
                gains = {"untuned": 0.0, "reg": 0.02, "cl": 0.04, "pooled-reg": 0.01, "pooled-cl": 0.03}
                for s in SETS:
                    if s.startswith("pooled") and rng.random() < 0.3:
                        row.update({f"layer_{s}": "", f"mean_r_{s}": np.nan, f"median_r_{s}": np.nan})
                        continue
                    median = base[roi] + gains[s] + rng.normal(0, 0.03)
                    row[f"layer_{s}"] = str(rng.choice(["features.5", "features.8", "features.10"]))
                    row[f"median_r_{s}"], row[f"mean_r_{s}"] = median, median - 0.02
                    for stat in ("mean", "median"):
                        centre = row[f"{stat}_r_{s}"]
                        row[f"{stat}_r_{s}_ci_low"] = centre - rng.uniform(0.01, 0.05)
                        row[f"{stat}_r_{s}_ci_high"] = centre + rng.uniform(0.01, 0.05)
                for a, b in COMPARISONS:
                    pair = f"{a}_vs_{b}"
                    row[f"pct_improved_{pair}"] = float(rng.uniform(30, 80))
                    for stat in ("mean", "median"):
                        diff = row[f"{stat}_r_{a}"] - row[f"{stat}_r_{b}"]
                        row[f"{stat}_diff_{pair}"] = diff
                        row[f"{stat}_diff_{pair}_ci_low"] = diff - 0.02
                        row[f"{stat}_diff_{pair}_ci_high"] = diff + 0.02
                        row[f"perm_p_{stat}_{pair}"] = float(rng.uniform(0, 1))
                for s in ("cl", "pooled-cl"):
                    if row.get(f"layer_{s}"):
                        top1 = float(rng.uniform(0.005, 0.2))
                        row.update({f"top1_of_300_{s}": top1, f"top1_of_300_{s}_ci_low": top1 - 0.006,
                                    f"top1_of_300_{s}_ci_high": top1 + 0.006, f"top5_of_300_{s}": 3 * top1,
                                    f"top1_of_all_{s}": top1 / 3, f"control_top1_of_300_{s}": 1 / 300,
                                    "chance_top1_of_300": 1 / 300})
                rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rows():
    return study_rows()


def voxel_maps(seed: int = 0, subjects=SUBJECTS[:2]) -> list[dict]:
    """generate_results' per-voxel r ({roi: sets x voxels}) of a few subject-hemispheres."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in subjects:
        for _ in utils.HEMISPHERES:
            m = {}
            for roi in utils.ROI_NAMES:
                untuned = rng.normal(0.3, 0.15, int(rng.integers(20, 400)))
                m[roi] = np.stack([untuned + g + rng.normal(0, 0.05, untuned.size)
                                   for g in (0, 0.02, 0.04, 0.01, 0.03)]).astype(np.float32)
                m[roi][3:, :5] = np.nan
            maps.append(m)
    return maps


def check_figure(fig, path) -> Image.Image:
    """Save as the pipeline does; then: <= MAX_PX wide, every text >= 7 pt, every axis with ticks labelled."""
    outputs.save_figure(path, fig)
    image = Image.open(path)
    assert image.size[0] <= MAX_PX, f"{path.name}: {image.size[0]} px wide"
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    assert min(sizes) >= 7, f"{path.name}: text at {min(sizes)} pt"
    supx = fig._supxlabel.get_text() if fig._supxlabel else ""
    supy = fig._supylabel.get_text() if fig._supylabel else ""
    for ax in (a for a in fig.axes if a.get_visible()):
        if hasattr(ax, "_colorbar"):
            assert ax.get_ylabel() or ax.get_xlabel(), f"{path.name}: colour bar without a label"
            continue
        shared_y = any(other.get_ylabel() and other.get_position().y0 == ax.get_position().y0
                       for other in fig.axes)
        if any(t.get_text() for t in ax.get_xticklabels()):
            assert ax.get_xlabel() or supx, f"{path.name}: {ax.get_title()!r} has no x label"
        if any(t.get_text() for t in ax.get_yticklabels()) or ax.yaxis.get_visible():
            assert ax.get_ylabel() or shared_y or supy, f"{path.name}: {ax.get_title()!r} has no y label"
    return image


def ci_segments(ax, gid: str) -> np.ndarray:
    """The (x, low, high) of every CI drawn as vertical lines with this gid."""
    collection = next(c for c in ax.collections if isinstance(c, LineCollection) and c.get_gid() == gid)
    return np.array([(s[0, 0], s[0, 1], s[1, 1]) for s in collection.get_segments()])


def test_roi_accuracy_of_one_subject_shows_each_roi_with_its_ci(rows, tmp_path):
    mine = [r for r in rows if r["subject"] == 3 and r["hemisphere"] == "rh"]
    fig = plots.plot_roi_accuracy(mine, SETS, "subj03 rh: test-split accuracy per ROI")
    check_figure(fig, tmp_path / "roi_accuracy.png")
    ax = next(a for a in fig.axes if a.get_title() == "floc-faces")
    point = next(line for line in ax.lines if line.get_gid() == "cl")
    faces = [r for r in mine if r["roi"] in utils.ROIS_BY_FAMILY["floc-faces"]]
    np.testing.assert_allclose(point.get_ydata(), [r.get("median_r_cl", np.nan) for r in faces])
    segments = ci_segments(ax, "cl_ci")
    finite = [r for r in faces if "median_r_cl_ci_low" in r]
    np.testing.assert_allclose(segments[:, 1:], [(r["median_r_cl_ci_low"], r["median_r_cl_ci_high"]) for r in finite])


def test_group_roi_accuracy_is_the_mean_over_subjects_with_a_t_ci(rows, tmp_path):
    lh = [r for r in rows if r["hemisphere"] == "lh"]
    fig = plots_study.plot_roi_accuracy_group(lh, SETS, "All subjects, lh")
    check_figure(fig, tmp_path / "group_roi_accuracy.png")
    ax = next(a for a in fig.axes if a.get_title() == "prf-visualrois")
    values = [r["median_r_reg"] for r in lh if r["roi"] == "V2d"]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    k = utils.ROIS_BY_FAMILY["prf-visualrois"].index("V2d")
    assert next(line for line in ax.lines if line.get_gid() == "reg").get_ydata()[k] == pytest.approx(np.mean(values))
    np.testing.assert_allclose(ci_segments(ax, "reg_ci")[k, 1:], [low, high])


def test_subject_pairs_join_each_subjects_family_means(rows, tmp_path):
    fig = plots_study.plot_subject_pairs(rows, SETS)
    check_figure(fig, tmp_path / "subject_pairs.png")
    members = utils.ROIS_BY_FAMILY["floc-places"]
    mine = [r for r in rows if r["subject"] == 5 and r["roi"] in members and np.isfinite(r.get("median_r_cl", np.nan))]
    line = next(line for ax in fig.axes for line in ax.lines if line.get_gid() == "cl|floc-places|5")
    np.testing.assert_allclose(line.get_ydata(), [np.mean([r["median_r_untuned"] for r in mine]),
                                                  np.mean([r["median_r_cl"] for r in mine])])
    n_lines = sum(1 for ax in fig.axes for line in ax.lines if str(line.get_gid()).startswith("cl|"))
    assert n_lines == len(SUBJECTS) * len(utils.ROI_FAMILIES)


def test_difference_heatmaps_centre_on_zero_and_hold_the_differences(rows, tmp_path):
    fig = plots_study.plot_difference_heatmaps(rows, [("cl", "untuned"), ("cl", "reg"), ("pooled-cl", "untuned")])
    check_figure(fig, tmp_path / "differences.png")
    ax = next(a for a in fig.axes if a.get_title() == "CL-tuned − reg-tuned, rh")
    image = ax.images[0]
    norm = image.norm
    assert norm.vmin == pytest.approx(-norm.vmax)
    rois = plots.ordered_rois(r["roi"] for r in rows if r["n_voxels"])
    row = next(r for r in rows if r["subject"] == 7 and r["hemisphere"] == "rh" and r["roi"] == "PPA")
    assert image.get_array()[rois.index("PPA"), 6] == pytest.approx(row["median_r_cl"] - row["median_r_reg"])
    assert image.get_array().shape == (len(utils.ROI_NAMES), len(SUBJECTS))


def test_voxel_hexbin_has_one_panel_per_family_and_the_identity(tmp_path):
    maps = voxel_maps()
    fig = plots_study.plot_voxel_hexbin(maps, SETS, "cl", "untuned")
    check_figure(fig, tmp_path / "hexbin.png")
    panels = [a for a in fig.axes if a.get_title() in utils.ROI_FAMILIES]
    assert len(panels) == 6
    words = next(a for a in panels if a.get_title() == "floc-words")
    counts = words.collections[0].get_array()
    n = sum(np.isfinite(m[r][2]).sum() for m in maps for r in utils.ROIS_BY_FAMILY["floc-words"])
    assert counts.sum() == n   # every voxel of the family in one hexagon (extent covers them all here)
    identity = next(line for line in words.lines if line.get_label() == "identity")
    np.testing.assert_allclose(identity.get_xdata(), identity.get_ydata())


def test_transfer_matrix_reads_on_any_colour_and_centres_percentages_on_50(tmp_path):
    rng = np.random.default_rng(1)
    improved = rng.uniform(20, 90, (8, 8))
    improved[2, 5] = np.nan
    fig = plots.plot_transfer_matrix(improved, SUBJECTS, "CL-tuned FFA-1 lh: % of the target's voxels beating its "
                                     "untuned model, every source x target pair", "% of target voxels improved",
                                     centre=50)
    check_figure(fig, tmp_path / "transfer.png")
    ax = fig.axes[0]
    norm = ax.images[0].norm
    assert (norm.vmin + norm.vmax) / 2 == pytest.approx(50)
    for text in ax.texts:   # each number in black or white, whichever contrasts more with its cell
        i, j = (int(round(v)) for v in text.get_position()[::-1])
        cell = ax.images[0].cmap(norm(improved[i, j]))
        luminance = plots.text_colour_on(cell)
        assert text.get_color() == luminance and text.get_text() == f"{improved[i, j]:.1f}"
    assert len(ax.texts) == 63
    assert plots.text_colour_on((1.0, 1.0, 0.8)) == "black" and plots.text_colour_on((0.1, 0.0, 0.3)) == "white"
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    title = ax.title.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width   # inside the figure, clear of the colour bar
    assert not title.overlaps(fig.axes[1].get_tightbbox(renderer))


def test_transfer_overview_shows_diagonal_and_off_diagonal_means(tmp_path):
    rng = np.random.default_rng(2)
    matrices = {(m, h, roi): rng.uniform(0.1, 0.5, (8, 8)) for m in ("cl", "reg") for h in utils.HEMISPHERES
                for roi in utils.ROI_NAMES}
    fig = plots_study.plot_transfer_overview(matrices, "median test r (Pearson)")
    check_figure(fig, tmp_path / "transfer_overview.png")
    matrix = matrices[("cl", "lh", "V1v")]
    diagonal, off = plots_study.diagonal_split(matrix)
    np.testing.assert_allclose(off, [np.mean(np.delete(matrix[:, j], j)) for j in range(8)])
    assert plots.mean_ci(diagonal)[0] == pytest.approx(np.trace(matrix) / 8)


def test_retrieval_heatmap_marks_chance(rows, tmp_path):
    fig = plots.plot_retrieval(rows, SETS)
    check_figure(fig, tmp_path / "retrieval.png")
    ax = next(a for a in fig.axes if a.get_title() == "CL-tuned, lh")
    row = next(r for r in rows if r["subject"] == 2 and r["hemisphere"] == "lh" and r["roi"] == "EBA")
    rois = [t.get_text() for t in ax.get_yticklabels()]
    assert ax.images[0].get_array()[rois.index("EBA"), 1] == pytest.approx(100 * row["top1_of_300_cl"])
    colour_bar = next(a for a in fig.axes if hasattr(a, "_colorbar"))
    assert [line.get_ydata()[0] for line in colour_bar.lines] == pytest.approx([100 / 300])


def test_retrieval_at_zero_keeps_chance_on_the_colour_bar(tmp_path):
    """A tiny run can retrieve nothing: the scale still reaches chance (1 of 24 here), the figure stays small."""
    rows = [{"subject": 1, "hemisphere": "lh", "roi": "FFA-1", "top1_of_24_cl": 0.0, "top1_of_24_cl_ci_low": 0.0,
             "top1_of_24_cl_ci_high": 0.0, "chance_top1_of_24": 1 / 24, "control_top1_of_24_cl": 0.0}]
    image = check_figure(plots.plot_retrieval(rows, ["untuned", "cl"]), tmp_path / "retrieval_zero.png")
    assert image.size[1] < 1000


def test_candidate_shares_heatmap(tmp_path):
    rng = np.random.default_rng(3)
    kinds = ["untuned", "cl", "reg", "pooled-cl", "pooled-reg"]
    share_rows = []
    for subject in SUBJECTS:
        for hemi in utils.HEMISPHERES:
            for name in ["all vertices"] + list(utils.ROI_NAMES):
                shares = rng.dirichlet(np.ones(len(kinds)))
                share_rows.append({"subject": subject, "hemisphere": hemi, "vertices": name,
                                   **{f"pct_{k}": 100 * v for k, v in zip(kinds, shares)}})
    fig = plots.plot_candidate_shares(share_rows, kinds)
    check_figure(fig, tmp_path / "shares.png")
    ax = next(a for a in fig.axes if a.get_title() == "CL-tuned")
    row = next(r for r in share_rows if (r["subject"], r["hemisphere"], r["vertices"]) == (4, "rh", "all vertices"))
    assert ax.images[0].get_array()[0, 7] == pytest.approx(row["pct_cl"])


def test_training_curves_median_and_iqr_over_runs(tmp_path):
    rng = np.random.default_rng(4)
    logs = {}
    for method, metric in (("cl", "val_top1"), ("reg", "val_r"), ("pooled-cl", "val_top1")):
        logs[method] = [[{"epoch": e, "train_loss": 3 / e + rng.normal(0, 0.1), "val_loss": 3.2 / e,
                          metric: 0.1 * np.log(e + 1) + rng.normal(0, 0.01)}
                         for e in range(1, int(rng.integers(20, 31)))] for _ in range(60)]
    path = tmp_path / "log.csv"
    outputs.save_csv(path, logs["reg"][0])
    assert plots_study.read_training_log(path)[2]["val_r"] == pytest.approx(logs["reg"][0][2]["val_r"])
    fig = plots_study.plot_training_curves(logs)
    check_figure(fig, tmp_path / "curves.png")
    line = next(line for ax in fig.axes for line in ax.lines if line.get_gid() == "reg|val_r")
    at_epoch_5 = [run[4]["val_r"] for run in logs["reg"]]
    assert line.get_ydata()[4] == pytest.approx(np.median(at_epoch_5))


def test_alpha_distribution_marks_the_grid_edges(tmp_path):
    rng = np.random.default_rng(5)
    alphas = {s: [rng.choice(GRID, size=int(rng.integers(20, 500)), p=np.linspace(1, 2, 7) / 10.5)
                  for _ in range(50)] for s in SETS}
    fig = plots_study.plot_alpha_distribution(alphas, GRID)
    check_figure(fig, tmp_path / "alphas.png")
    pooled = np.concatenate(alphas["cl"])
    shares = [100 * np.mean(pooled == g) for g in GRID]
    bars = [p for p in fig.axes[0].patches if p.get_gid() == "cl"]
    np.testing.assert_allclose([b.get_height() for b in bars], shares)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"CL-tuned: {shares[0]:.0f}% at lowest, {shares[-1]:.0f}% at highest" in legend


def test_layer_search_loso_and_probe_figures_stay_readable(tmp_path):
    rng = np.random.default_rng(6)
    layers = ["features.2", "features.5", "features.7", "features.9", "features.12", "classifier.2",
              "classifier.5", "classifier.6"]
    scores = rng.uniform(0.1, 0.5, (8, 31))
    scores[:, 10] = np.nan
    fig = plots.plot_layer_roi_heatmap(scores, layers, list(utils.ROI_NAMES), "subj01 lh: untuned AlexNet")
    check_figure(fig, tmp_path / "layers.png")
    loso = [{"subject": s, "hemisphere": h, "roi": roi, "feature_set": p,
             **{f"median_r_{k}": float(rng.uniform(0.1, 0.5)) for k in ("without_subject", "with_subject",
                                                                         "untuned", "own")}}
            for s in SUBJECTS for h in utils.HEMISPHERES for roi in utils.ROI_NAMES
            for p in ("pooled-cl", "pooled-reg")]
    check_figure(plots.plot_leave_one_subject_out(loso), tmp_path / "loso.png")
    probe = [{"method": "untuned", "subject": 0, "hemisphere": "", "roi": "", "accuracy": 0.6, "chance": 0.1}]
    probe += [{"method": m, "subject": s, "hemisphere": h, "roi": roi, "accuracy": float(rng.uniform(0.4, 0.7)),
               "chance": 0.1} for m in ("cl", "reg") for s in SUBJECTS for h in utils.HEMISPHERES
              for roi in utils.ROI_NAMES]
    check_figure(plots.plot_probe_bars(probe, "Linear probe on caltech256 (257 classes, classifier.5)"),
                 tmp_path / "probe.png")


def test_mean_ci_matches_scipy():
    values = [0.2, 0.35, 0.3, np.nan, 0.41]
    mean, low, high, n = plots.mean_ci(values)
    finite = [0.2, 0.35, 0.3, 0.41]
    assert n == 4 and mean == pytest.approx(np.mean(finite))
    assert (low, high) == pytest.approx(stats.t.interval(0.95, 3, loc=np.mean(finite), scale=stats.sem(finite)))


NAN_ROW = {"subject": 1, "hemisphere": "lh", "roi": "FFA-1", "n_voxels": 10, "median_r_untuned": np.nan,
           "layer_untuned": ""}
DEGENERATE = {
    "no_rows": lambda: plots.plot_roi_accuracy([], ["untuned"], "nothing measured"),
    "all_nan": lambda: plots_study.plot_roi_accuracy_group([NAN_ROW], ["untuned", "cl"], "no scores"),
    "no_comparison_values": lambda: plots_study.plot_difference_heatmaps([NAN_ROW], [("cl", "untuned")]),
    "no_voxels": lambda: plots_study.plot_voxel_hexbin({"FFA-1": np.full((2, 3), np.nan)}, ["untuned", "cl"], "cl"),
    "no_retrieval": lambda: plots.plot_retrieval([NAN_ROW], ["cl"]),
    "nan_matrix": lambda: plots.plot_transfer_matrix(np.full((2, 2), np.nan), [1, 2], "no models", "%", centre=50),
    "no_alphas": lambda: plots_study.plot_alpha_distribution({}, GRID),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_empty_or_all_nan_inputs_give_a_small_figure(case, tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # e.g. a layout that collapsed, a legend of nothing
        image = outputs.save_figure(tmp_path / f"{case}.png", DEGENERATE[case]())
    assert max(Image.open(image).size) < 1500
