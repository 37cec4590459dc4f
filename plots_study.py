"""Figures across the whole study: group per-ROI accuracy, paired subject dots, difference heatmaps, per-voxel
hexbins, the cross-subject transfer overview, training curves and chosen ridge alphas (style in plots.py)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

import feature_sets as fsets
import utils
from plots import (accuracy_figure, colour_bar_shrink, family_separators, finish, heatmap, mean_ci, new_figure,
                   ordered_rois, panel_grid, subject_label, symmetric_norm, value, wrap_title)


def subject_values(rows: list[dict], column: str) -> dict:
    """{(roi, subject): the column's value averaged over the subject's hemispheres where it is finite}."""
    collected: dict = {}
    for r in rows:
        v = value(r, column)
        if np.isfinite(v):
            collected.setdefault((r["roi"], int(r["subject"])), []).append(v)
    return {k: float(np.mean(v)) for k, v in collected.items()}


def plot_roi_accuracy_group(rows: list[dict], feature_sets, title: str, statistic: str = "median"):
    """Across subjects: each set's mean over subjects of the ROI's median (or mean) test r (each subject's average
    over the hemispheres in rows) with a 95% t CI over subjects, one panel per ROI family."""
    rois = ordered_rois(r["roi"] for r in rows)
    subjects = sorted({int(r["subject"]) for r in rows})
    sets = [s for s in feature_sets if any(np.isfinite(value(r, f"{statistic}_r_{s}")) for r in rows)]
    entries = {}
    for s in sets:
        per_subject = subject_values(rows, f"{statistic}_r_{s}")
        for roi in rois:
            mean, low, high, _ = mean_ci([per_subject.get((roi, subject), np.nan) for subject in subjects])
            entries[(s, roi)] = (mean, low, high)
    return accuracy_figure(entries, sets, rois, title, f"{statistic} Pearson r over the ROI's voxels\n"
                            "(test split, mean over subjects)", f"lines: 95% t CI over {len(subjects)} subjects")


def _unit_members(by: str) -> dict:
    if by == "family":
        return {f: utils.ROIS_BY_FAMILY[f] for f in utils.ROI_FAMILIES}
    if by == "group":
        return dict(utils.ROI_GROUPS)
    raise ValueError(f"by={by!r}: expected 'family' or 'group'")


def paired_unit_values(rows: list[dict], feature_set: str, baseline: str, members, statistic: str = "median"):
    """{subject: (baseline, set)}: each subject's mean over the ROIs in members (and its hemispheres) where both
    sets have a finite score."""
    pairs: dict = {}
    for r in rows:
        a, b = value(r, f"{statistic}_r_{feature_set}"), value(r, f"{statistic}_r_{baseline}")
        if r["roi"] in members and np.isfinite(a) and np.isfinite(b):
            pairs.setdefault(int(r["subject"]), []).append((b, a))
    return {s: tuple(np.mean(v, axis=0)) for s, v in sorted(pairs.items())}


def plot_subject_pairs(rows: list[dict], feature_sets, baseline: str = "untuned", by: str = "family",
                       statistic: str = "median"):
    """One panel per set: per ROI family (or group), one dot per subject for the baseline and the set joined by a
    line (paired), with the mean over subjects and its 95% t CI; 'k/n' subjects improved above each pair."""
    units = _unit_members(by)
    sets = [s for s in feature_sets if s != baseline
            and any(np.isfinite(value(r, f"{statistic}_r_{s}")) for r in rows)]
    fig, axes = panel_grid(len(sets), 2, 0.9 + 0.85 * len(units), 3.2, extra_w=1.0, sharey=True)
    for ax, s in zip(axes, sets):
        for x, (unit, members) in enumerate(units.items()):
            pairs = paired_unit_values(rows, s, baseline, members, statistic)
            for subject, (b, a) in pairs.items():
                ax.plot([x - 0.2, x + 0.2], [b, a], color="grey", lw=0.7, alpha=0.8, gid=f"{s}|{unit}|{subject}")
            if pairs:
                values = np.array(list(pairs.values()))
                ax.plot(np.full(len(values), x - 0.2), values[:, 0], "o", ms=3.5, color=fsets.colour(baseline))
                ax.plot(np.full(len(values), x + 0.2), values[:, 1], "o", ms=3.5, color=fsets.colour(s))
                for offset, column in ((-0.36, 0), (0.36, 1)):
                    mean, low, high, _ = mean_ci(values[:, column])
                    ax.vlines(x + offset, low, high, color="black", lw=1.2)
                    ax.plot(x + offset, mean, "_", ms=8, color="black")
                ax.annotate(f"{int((values[:, 1] > values[:, 0]).sum())}/{len(values)}", (x, 1.0),
                            xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(units)), list(units), rotation=30, ha="right")
        ax.set_xlim(-0.6, len(units) - 0.4)
        ax.set_title(f"{fsets.label(s)} vs {fsets.label(baseline)}", fontsize=9, pad=14)
        ax.grid(axis="y", lw=0.3)
        ax.set_xlabel(f"ROI {by}")
    for ax in axes:
        if ax.get_subplotspec().colspan.start == 0:
            ax.set_ylabel(f"{statistic} test Pearson r,\nmean over the {by}'s ROIs")
    fig.suptitle(wrap_title(f"Per subject (dots; left {fsets.label(baseline)}, right the tuned set; lines pair a "
                            "subject; black: mean and 95% t CI over subjects; k/n: subjects improved)",
                            fig.get_figwidth()), fontsize=10)
    return finish(fig)


def difference_matrix(rows: list[dict], a: str, b: str, hemi: str, rois, subjects, statistic: str = "median"):
    """ROI x subject: statistic r of a minus b, and where the bootstrap CI of that difference excludes 0."""
    diff = np.full((len(rois), len(subjects)), np.nan)
    excludes = np.zeros(diff.shape, dtype=bool)
    column = f"{statistic}_diff_{a}_vs_{b}"
    for r in rows:
        if r["hemisphere"] == hemi and r["roi"] in rois and int(r["subject"]) in subjects:
            i, j = rois.index(r["roi"]), subjects.index(int(r["subject"]))
            diff[i, j] = value(r, f"{statistic}_r_{a}") - value(r, f"{statistic}_r_{b}")
            low, high = value(r, f"{column}_ci_low"), value(r, f"{column}_ci_high")
            excludes[i, j] = low > 0 or high < 0
    return diff, excludes


def plot_difference_heatmaps(rows: list[dict], comparisons, statistic: str = "median"):
    """ROI x subject heatmaps of set minus baseline (median test r) per comparison and hemisphere, a diverging
    scale centred on 0 shared by all panels; a dot where the 95% bootstrap CI of the difference excludes 0."""
    hemis = [h for h in utils.HEMISPHERES if any(r["hemisphere"] == h for r in rows)]
    rois = ordered_rois(r["roi"] for r in rows if value(r, "n_voxels") > 0)
    subjects = sorted({int(r["subject"]) for r in rows})
    panels = [(a, b, h) for a, b in comparisons for h in hemis]
    matrices = [difference_matrix(rows, a, b, h, rois, subjects, statistic) for a, b, h in panels]
    norm = symmetric_norm(np.concatenate([m.ravel() for m, _ in matrices]) if matrices else [], 0.0)
    fig, axes = panel_grid(len(panels), 3 * len(hemis), 0.5 + 0.26 * len(subjects), 0.9 + 0.19 * len(rois),
                            sharey=True)
    image = None
    for ax, (a, b, h), (diff, excludes) in zip(axes, panels, matrices):
        image = heatmap(ax, diff, rois, [subject_label(s) for s in subjects], "RdBu_r", norm, marks=excludes)
        family_separators(ax, rois)
        ax.set_title(wrap_title(f"{fsets.label(a)} − {fsets.label(b)}, {h}", 2.2, 9), fontsize=9)
        ax.set_xlabel("subject")
        if ax.get_subplotspec().colspan.start == 0:
            ax.set_ylabel("ROI")
    if image is not None:
        fig.colorbar(image, ax=list(axes), extend="both", shrink=colour_bar_shrink(fig),
                     label=f"difference of {statistic} test r (Pearson r)")
    fig.suptitle(wrap_title(f"Difference of each ROI's {statistic} test r, per subject (grey: no voxels or no model;"
                            " dot: 95% bootstrap CI over test images excludes 0)", fig.get_figwidth()), fontsize=10)
    return finish(fig)


def plot_voxel_hexbin(voxel_r, feature_sets, feature_set: str, baseline: str = "untuned", title: str = ""):
    """Per ROI family: per-voxel test r of feature_set (y) against baseline (x), hexbin counts on a log scale,
    the identity line, the share of voxels above it and the median difference. voxel_r: {roi: sets x voxels}
    as generate_results saves it (rows in feature_sets order), or a list of them (subjects, hemispheres)."""
    from matplotlib.colors import LogNorm
    maps = [voxel_r] if isinstance(voxel_r, dict) else list(voxel_r)
    ia, ib = list(feature_sets).index(feature_set), list(feature_sets).index(baseline)
    pooled: dict = {}
    for m in maps:
        for roi, r in m.items():
            r = np.asarray(r, dtype=float)
            keep = np.isfinite(r[ia]) & np.isfinite(r[ib])
            pooled.setdefault(utils.ROI_FAMILY_OF[roi], []).append(r[[ib, ia]][:, keep])
    families = [f for f in utils.ROI_FAMILIES if f in pooled and sum(p.shape[1] for p in pooled[f])]
    data = {f: np.concatenate(pooled[f], axis=1) for f in families}
    everything = np.concatenate(list(data.values()), axis=1) if data else np.zeros((2, 1))
    lo, hi = everything.min(), everything.max()
    lo, hi = lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo)
    fig, axes = panel_grid(len(families), 3, 3.2, 3.1, extra_w=1.5)
    collections = []
    for ax, family in zip(axes, families):
        x, y = data[family]
        collections.append(ax.hexbin(x, y, gridsize=35, extent=(lo, hi, lo, hi), mincnt=1, cmap="viridis",
                                     linewidths=0))
        ax.plot([lo, hi], [lo, hi], color="red", lw=1, label="identity")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.text(0.03, 0.97, f"{x.size} voxels\nabove line: {100 * np.mean(y > x):.0f}%\n"
                f"median Δr: {np.median(y - x):+.3f}", transform=ax.transAxes, va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.set_title(family, fontsize=9)
        ax.set_xlabel(f"{fsets.label(baseline)} test r (Pearson)")
        ax.set_ylabel(f"{fsets.label(feature_set)} test r (Pearson)")
    if collections:
        top = max(float(c.get_array().max()) for c in collections)
        norm = LogNorm(1, max(top, 2))
        for c in collections:
            c.set_norm(norm)
        fig.colorbar(collections[-1], ax=list(axes), label="voxels per hexagon (log scale)",
                     shrink=colour_bar_shrink(fig))
    fig.suptitle(wrap_title(title or f"Per-voxel test r: {fsets.label(feature_set)} vs {fsets.label(baseline)} "
                            "(red: identity)", fig.get_figwidth()), fontsize=10)
    return finish(fig)


# ---- cross-subject transfer across ROIs ----

def diagonal_split(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per target subject: the own backbone's value (diagonal) and the mean over other subjects' backbones."""
    matrix = np.asarray(matrix, dtype=float)
    off = np.where(np.eye(len(matrix), dtype=bool), np.nan, matrix)
    counts = np.isfinite(off).sum(0)
    off_mean = np.where(counts > 0, np.nansum(off, axis=0) / np.maximum(counts, 1), np.nan)
    return np.diag(matrix).copy(), off_mean


def plot_transfer_overview(matrices: dict, statistic_label: str, title: str = ""):
    """Across ROIs: each backbone on its own subject (diagonal, filled) vs on other subjects (off-diagonal, open),
    mean over target subjects with a 95% t CI. matrices: {(method, hemisphere, roi): source x target array}."""
    methods = list(dict.fromkeys(k[0] for k in matrices))
    hemis = [h for h in utils.HEMISPHERES if any(k[1] == h for k in matrices)]
    rois = ordered_rois(k[2] for k in matrices)
    fig, axes = new_figure(3.0 + 0.17 * len(rois) * max(len(methods), 1), 0.8 + 2.8 * len(hemis),
                           nrows=len(hemis), sharex=True, sharey=True)
    width = 0.7 / max(len(methods), 1)
    for ax, hemi in zip(axes[:, 0], hemis):
        for m, method in enumerate(methods):
            colour = fsets.colour(method)
            for x, roi in enumerate(rois):
                if (method, hemi, roi) not in matrices:
                    continue
                diagonal, off = diagonal_split(matrices[(method, hemi, roi)])
                pos = x + (m - (len(methods) - 1) / 2) * width + np.array([-0.2, 0.2]) * width
                stats = [mean_ci(diagonal), mean_ci(off)]
                ax.plot(pos, [s[0] for s in stats], color=colour, lw=1)
                for p, (mean, low, high, _), face in zip(pos, stats, (colour, "white")):
                    ax.errorbar(p, mean, yerr=[[mean - low], [high - mean]] if np.isfinite(low) else None,
                                fmt="o", ms=4, color=colour, mfc=face, capsize=2, lw=1)
        ax.set_ylabel(statistic_label)
        ax.set_title(hemi, fontsize=9, loc="left")
        ax.grid(axis="y", lw=0.3)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=fsets.colour(m), marker="o", label=fsets.label(m)) for m in methods]
    handles += [Line2D([], [], color="black", marker="o", ls="", label="own subject (diagonal)"),
                Line2D([], [], color="black", marker="o", mfc="white", ls="", label="other subjects (off-diagonal)")]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=len(handles))
    axes[-1, 0].set_xticks(range(len(rois)), rois, rotation=90)
    axes[-1, 0].set_xlim(-0.6, len(rois) - 0.4)
    axes[-1, 0].set_xlabel("ROI (mean over target subjects, 95% t CI over subjects)")
    fig.suptitle(wrap_title(title or f"Cross-subject transfer: {statistic_label}", fig.get_figwidth()), fontsize=10)
    return finish(fig)


# ---- training curves and chosen ridge alphas ----

def read_training_log(path) -> list[dict]:
    """A run's log.csv -> rows of floats (one per epoch); empty cells NaN."""
    with open(Path(path), newline="") as fh:
        return [{k: value(r, k) for k in r} for r in csv.DictReader(fh)]


_LOSS_UNITS = {"cl": "InfoNCE loss (nats)", "reg": "MSE (fMRI units²)"}
_METRIC_LABELS = {"val_top1": "val top-1 fMRI→image retrieval\n(fraction of val images)",
                  "val_r": "val mean voxel Pearson r"}


def _metric_of(run: list[dict]) -> str:
    """The val metric column of a log: 'val_<name>' other than val_loss and the per-subject columns."""
    names = [k for k in (run[0] if run else {}) if k.startswith("val_") and k not in ("val_loss", "val_s")
             and "_subj" not in k]
    return names[0] if names else ""


def _epoch_matrix(runs: list[list[dict]], column: str):
    epochs = np.array(sorted({int(r["epoch"]) for run in runs for r in run}))
    matrix = np.full((len(runs), len(epochs)), np.nan)
    for i, run in enumerate(runs):
        for r in run:
            matrix[i, np.searchsorted(epochs, int(r["epoch"]))] = value(r, column)
    return epochs, matrix


def plot_training_curves(logs: dict, title: str = "Training curves", max_single_runs: int = 8):
    """Per training method (row): train loss, val loss and the val metric per epoch, the median over runs (ROIs,
    subjects, hemispheres) with its interquartile band; each run drawn thin when there are few.
    logs: {feature set: [rows of a log.csv (read_training_log), ...]}."""
    import warnings
    methods = [m for m, runs in logs.items() if runs]
    fig, axes = new_figure(11.0, 0.8 + 2.4 * max(len(methods), 1), nrows=max(len(methods), 1), ncols=3)
    for row, method in zip(axes, methods):
        runs = logs[method]
        kind = fsets.method_of(method) if fsets.is_tuned(method) else method
        metric = _metric_of(runs[0])
        for ax, column, ylabel in zip(row, ("train_loss", "val_loss", metric),
                                      (f"train {_LOSS_UNITS.get(kind, 'loss')}", f"val {_LOSS_UNITS.get(kind, 'loss')}",
                                       _METRIC_LABELS.get(metric, metric))):
            epochs, matrix = _epoch_matrix(runs, column)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # an epoch no run reached
                q25, median, q75 = np.nanpercentile(matrix, [25, 50, 75], axis=0)
            colour = fsets.colour(method)
            if len(runs) <= max_single_runs:
                for curve in matrix:
                    ax.plot(epochs, curve, color=colour, lw=0.6, alpha=0.4)
            ax.fill_between(epochs, q25, q75, color=colour, alpha=0.25, lw=0, label="interquartile range")
            ax.plot(epochs, median, color=colour, lw=1.8, label=f"median of {len(runs)} runs", gid=f"{method}|{column}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(lw=0.3)
        row[0].set_title(f"{fsets.label(method)} ({len(runs)} runs)", fontsize=9, loc="left")
        row[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return finish(fig)


def alpha_shares(alphas, grid) -> tuple[np.ndarray, np.ndarray]:
    """Per grid alpha: the % of all voxels choosing it, and per model (array) the % of its voxels (models x grid)."""
    one_model = isinstance(alphas, np.ndarray) and alphas.ndim == 1 or (
        isinstance(alphas, (list, tuple)) and len(alphas) and np.isscalar(alphas[0]))
    arrays = [np.asarray(alphas, dtype=float)] if one_model else [np.asarray(a, dtype=float) for a in alphas]
    grid = np.asarray(grid, dtype=float)
    counts = np.array([[np.isclose(a, g, rtol=1e-9).sum() for g in grid] for a in arrays], dtype=float)
    per_model = 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return 100 * counts.sum(0) / max(counts.sum(), 1), per_model


def plot_alpha_distribution(alphas: dict, grid, title: str = "Chosen ridge alphas"):
    """Per set: the % of voxels choosing each alpha of the grid (bars, over all models), the interquartile range
    over models (lines), and the share at the grid's lowest and highest alpha in the legend (shaded: the edges,
    where a wider grid may choose differently). alphas: {set: per-voxel alphas, or a list of them per model}."""
    sets = [s for s, a in alphas.items() if len(a)]
    grid = np.sort(np.asarray(grid, dtype=float))
    fig, axes = new_figure(3.5 + 0.12 * len(grid) * max(len(sets), 1) + 0.3 * len(grid), 4)
    ax = axes[0, 0]
    width = 0.8 / max(len(sets), 1)
    for edge in (0, len(grid) - 1):
        ax.axvspan(edge - 0.5, edge + 0.5, color="#fff3cd", zorder=0)
    for m, s in enumerate(sets):
        pooled, per_model = alpha_shares(alphas[s], grid)
        x = np.arange(len(grid)) + (m - (len(sets) - 1) / 2) * width
        ax.bar(x, pooled, width, color=fsets.colour(s), gid=s,
               label=f"{fsets.label(s)}: {pooled[0]:.0f}% at lowest, {pooled[-1]:.0f}% at highest")
        if len(per_model) > 1:
            q25, q75 = np.percentile(per_model, [25, 75], axis=0)
            ax.vlines(x, q25, q75, color="black", lw=1)
    ax.set_xticks(range(len(grid)), [f"{g:.0e}".replace("e+0", "e").replace("e-0", "e-") for g in grid])
    ax.set_xlim(-0.6, len(grid) - 0.4)
    ax.set_xlabel("ridge alpha (grid; shaded: its edges)")
    ax.set_ylabel("voxels choosing the alpha (%)")
    if sets:
        ax.legend(fontsize=8, title="black lines: interquartile range over models", title_fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(wrap_title(title, fig.get_figwidth()), fontsize=10)
    return finish(fig)
