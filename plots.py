"""Every figure of the pipeline (matplotlib, Agg backend): heatmaps, bars, violins, transfer matrices, probes."""
from __future__ import annotations

import numpy as np

import paths
import utils

METHOD_COLOURS = {"untuned": "#9e9e9e", "reg": "#1f77b4", "cl": "#d62728", "pooled-reg": "#9ecae1",
                  "pooled-cl": "#fc9272"}
METHOD_LABELS = {"untuned": "untuned (best layer)", "reg": "reg-tuned", "cl": "CL-tuned", "pooled-reg": "pooled reg",
                 "pooled-cl": "pooled CL"}


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


def plot_roi_bars(rows: list[dict], feature_sets, title: str):
    """Grouped bars per ROI, one per feature set with a model: median test r (bar) and mean test r (dot)."""
    plt = _plt()
    shown = [s for s in feature_sets if any(np.isfinite(float(r.get(f"median_r_{s}", np.nan))) for r in rows)]
    rois = [r["roi"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(rois) * max(len(shown), 1)), 4))
    width = 0.8 / max(len(shown), 1)
    x = np.arange(len(rois))
    for k, feature_set in enumerate(shown):
        offset = x + (k - (len(shown) - 1) / 2) * width
        ax.bar(offset, [r.get(f"median_r_{feature_set}", np.nan) for r in rows], width,
               label=METHOD_LABELS.get(feature_set, feature_set), color=METHOD_COLOURS.get(feature_set))
        ax.plot(offset, [r.get(f"mean_r_{feature_set}", np.nan) for r in rows], "o", ms=3, color="black")
    ax.set_xticks(x, rois, rotation=90, fontsize=8)
    ax.set_xlabel("ROI")
    ax.set_ylabel("Pearson r over the ROI's voxels (test split)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
    names = [paths.subject_dir_name(s) for s in subjects]
    ax.set_xticks(range(len(subjects)), names, rotation=45)
    ax.set_yticks(range(len(subjects)), names)
    ax.set_xlabel("encoded subject (target)")
    ax.set_ylabel("backbone tuned on subject (source)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return fig


def plot_probe_bars(rows: list[dict], title: str):
    """Linear-probe accuracy per tuned backbone coloured by method; the untuned backbone and chance as lines."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    plt = _plt()
    tuned = [r for r in rows if r["method"] != "untuned"]
    labels = [f"{r['method']} {paths.subject_dir_name(r['subject']) + ' ' if r['subject'] else ''}{r['hemisphere']} "
              f"{r['roi']}" for r in tuned]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(tuned) + 2), 4))
    ax.bar(range(len(tuned)), [100 * r["accuracy"] for r in tuned],
           color=[METHOD_COLOURS.get(r["method"], "#555555") for r in tuned])
    handles = [Patch(color=METHOD_COLOURS.get(m, "#555555"), label=METHOD_LABELS.get(m, m))
               for m in dict.fromkeys(r["method"] for r in tuned)]
    for r in rows:
        if r["method"] == "untuned":
            ax.axhline(100 * r["accuracy"], color="black", ls="--", lw=1)
            handles.append(Line2D([], [], color="black", ls="--", label="untuned AlexNet"))
    chance = rows[0].get("chance") if rows else None
    if chance:
        ax.axhline(100 * chance, color="grey", ls=":", lw=1)
        handles.append(Line2D([], [], color="grey", ls=":", label="chance (largest class)"))
    ax.set_xticks(range(len(tuned)), labels, rotation=90, fontsize=7)
    ax.set_xlabel("backbone (method, subject, hemisphere, ROI)")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_leave_one_subject_out(rows: list[dict]):
    """Per subject x ROI: median test r of the pooled backbone without the subject, with it, own and untuned."""
    plt = _plt()
    columns = [("untuned", "untuned", "untuned"), ("own", None, "own per-subject backbone"),
               ("with_subject", None, "pooled, trained with the subject"),
               ("without_subject", None, "pooled, trained WITHOUT the subject")]
    labels = [f"{paths.subject_dir_name(r['subject'])} {r['hemisphere']} {r['roi']} ({r['feature_set']})" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 3), 4))
    width = 0.8 / len(columns)
    x = np.arange(len(rows))
    shades = ["#9e9e9e", "#6baed6", "#fc9272", "#cb181d"]
    for k, ((key, _, label), colour) in enumerate(zip(columns, shades)):
        ax.bar(x + (k - 1.5) * width, [r.get(f"median_r_{key}", np.nan) for r in rows], width, label=label,
               color=colour)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("median Pearson r (test split)")
    ax.set_xlabel("encoded subject, hemisphere, ROI (pooled set)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title("Leave-one-subject-out: pooled backbones on a subject they never saw")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_candidate_shares(rows: list[dict], kinds):
    """Per subject, hemisphere and ROI: the share of vertices whose submitted prediction uses each kind of
    candidate feature set (stacked bars), from predict_test_images.py's report rows."""
    plt = _plt()
    labels = [f"{paths.subject_dir_name(r['subject'])} {r['hemisphere']} {r['vertices']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(rows) + 3), 4))
    bottom = np.zeros(len(rows))
    for kind in kinds:
        shares = np.array([r.get(f"pct_{kind}", 0.0) for r in rows])
        ax.bar(range(len(rows)), shares, bottom=bottom, label=METHOD_LABELS.get(kind, kind),
               color=METHOD_COLOURS.get(kind))
        bottom += shares
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_xlabel("subject, hemisphere, vertices (all, or an ROI's)")
    ax.set_ylabel("vertices choosing the candidate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Which feature set each vertex's submitted prediction uses (chosen by val r)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_retrieval(rows: list[dict], feature_sets):
    """fMRI -> image top-1 retrieval of the contrastive sets per subject, hemisphere and ROI, with bootstrap 95% CI,
    chance and the shuffled-fMRI control."""
    plt = _plt()
    entries = []
    for r in rows:
        for s in feature_sets:
            key = next((k for k in r if k.startswith("top1_of_") and k.endswith(f"_{s}")
                        and not k.startswith("top1_of_all")), None)
            if key is not None:
                entries.append((f"{paths.subject_dir_name(r['subject'])} {r['hemisphere']} {r['roi']}", s, r[key],
                                r[f"{key}_ci_low"], r[f"{key}_ci_high"], r.get(f"control_{key}"),
                                r.get("chance_" + key[:-len(s) - 1]), key.split("_")[2]))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(entries) + 3), 4))
    for k, (label, s, value, low, high, control, chance, pool) in enumerate(entries):
        ax.bar(k, 100 * value, color=METHOD_COLOURS.get(s), label=METHOD_LABELS.get(s, s))
        ax.errorbar(k, 100 * value, yerr=[[100 * (value - low)], [100 * (high - value)]], color="black", capsize=3)
        if control is not None:
            ax.plot(k, 100 * control, "kx", label="shuffled-fMRI control")
        if chance is not None:
            ax.plot([k - 0.4, k + 0.4], [100 * chance] * 2, color="grey", ls=":", label=f"chance (1 of {pool})")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.set_xticks(range(len(entries)), [e[0] for e in entries], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("subject, hemisphere, ROI")
    ax.set_ylabel("top-1 fMRI -> image retrieval (%)")
    ax.set_title("Retrieval among test images (candidates: 300, or all when fewer)")
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
