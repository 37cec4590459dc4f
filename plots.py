"""Every figure of the pipeline (matplotlib, Agg backend): heatmaps, per-ROI bars, violins, transfer matrices, probes."""
from __future__ import annotations

import numpy as np

import utils

METHOD_COLOURS = {"untuned": "#9e9e9e", "reg": "#1f77b4", "cl": "#d62728"}
METHOD_LABELS = {"untuned": "untuned (best layer)", "reg": "reg-tuned", "cl": "CL-tuned"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_layer_roi_heatmap(scores: np.ndarray, layers, rois, title: str):
    """Layers x ROIs heatmap of median val r, the best layer of each ROI outlined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, 0.38 * len(rois)), 4.2))
    image = ax.imshow(scores, aspect="auto", cmap="viridis")
    for j in range(scores.shape[1]):
        if np.isfinite(scores[:, j]).any():
            i = int(np.nanargmax(scores[:, j]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.5))
    ax.set_xticks(range(len(rois)), rois, rotation=90, fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("ROI (empty ROIs blank)")
    ax.set_ylabel("AlexNet layer")
    ax.set_title(title + " (outline: best layer)")
    fig.colorbar(image, ax=ax, label="median Pearson r (val split)")
    return fig


def plot_roi_bars(rows: list[dict], methods, title: str, value: str = "median_r_{}"):
    """Grouped bars per ROI: one bar per method, value = median test r."""
    plt = _plt()
    rois = [r["roi"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rois) * len(methods) / 2), 4))
    width = 0.8 / len(methods)
    x = np.arange(len(rois))
    for k, method in enumerate(methods):
        vals = [r.get(value.format(method), np.nan) for r in rows]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=METHOD_LABELS.get(method, method),
               color=METHOD_COLOURS.get(method))
    ax.set_xticks(x, rois, rotation=90, fontsize=8)
    ax.set_xlabel("ROI")
    ax.set_ylabel("median Pearson r (test split)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_voxel_differences(differences: dict, title: str, label: str):
    """Violins of per-voxel r differences per ROI (e.g. CL-tuned minus untuned)."""
    plt = _plt()
    rois = [roi for roi, d in differences.items() if np.isfinite(d).sum() > 1]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rois)), 4))
    if rois:
        data = [d[np.isfinite(d)] for d in (differences[r] for r in rois)]
        parts = ax.violinplot(data, showmedians=True)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
        ax.set_xticks(range(1, len(rois) + 1), rois, rotation=90, fontsize=8)
    ax.axhline(0, color="black", lw=0.7, ls="--")
    ax.set_xlabel("ROI")
    ax.set_ylabel(f"{label} (Pearson r, per voxel)")
    ax.set_title(title)
    return fig


def plot_transfer_matrix(matrix: np.ndarray, subjects, title: str, colorbar_label: str):
    """Annotated source x target subject heatmap (rows: backbone's subject, columns: encoded subject)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(subjects), 0.6 + 0.7 * len(subjects)))
    image = ax.imshow(matrix, cmap="magma", vmin=np.nanmin(matrix) if np.isfinite(matrix).any() else 0)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            text = "–" if not np.isfinite(matrix[i, j]) else f"{matrix[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if i != j else "cyan")
    names = [utils.subject_dir_name(s) for s in subjects]
    ax.set_xticks(range(len(subjects)), names, rotation=45)
    ax.set_yticks(range(len(subjects)), names)
    ax.set_xlabel("encoded subject (target)")
    ax.set_ylabel("backbone tuned on subject (source)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return fig


def plot_probe_bars(rows: list[dict], title: str):
    """Linear-probe accuracy per tuned model, the untuned backbone as a dashed line."""
    plt = _plt()
    tuned = [r for r in rows if r["method"] != "untuned"]
    labels = [f"{r['method']} {utils.subject_dir_name(r['subject'])} {r['hemisphere']} {r['roi']}" for r in tuned]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(tuned)), 4))
    ax.bar(range(len(tuned)), [100 * r["accuracy"] for r in tuned],
           color=[METHOD_COLOURS.get(r["method"]) for r in tuned])
    for r in rows:
        if r["method"] == "untuned":
            ax.axhline(100 * r["accuracy"], color="black", ls="--", lw=1, label="untuned AlexNet")
    chance = rows[0].get("chance") if rows else None
    if chance:
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="chance")
    for method in dict.fromkeys(r["method"] for r in tuned):
        ax.bar([], [], color=METHOD_COLOURS.get(method), label=METHOD_LABELS.get(method, method))
    ax.set_xticks(range(len(tuned)), labels, rotation=90, fontsize=7)
    ax.set_xlabel("backbone (method, subject, hemisphere, ROI)")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig

