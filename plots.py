"""The style every figure shares and the figures of one subject or one stage: per-ROI accuracy, layer search,
transfer matrix, leave-one-subject-out, probes, retrieval, submission; figures across subjects: plots_study.py.

Every figure is drawn for the full study (8 subjects x 2 hemispheres x 31 ROIs x 5 feature sets): at most
MAX_WIDTH_IN wide before the tight bounding box (outputs.save_figure: 130 dpi), text >= MIN_FONT_PT.
"""
from __future__ import annotations

import textwrap

import numpy as np

import feature_sets as fsets
import paths
import utils

MIN_FONT_PT = 7        # the smallest text (cell numbers); ticks and labels are larger
TICK_PT = 8
MAX_WIDTH_IN = 20.0    # 2,600 px at 130 dpi
HEMI_MARKERS = {"lh": "o", "rh": "s"}
MISSING = "#bdbdbd"    # cells without a value (darker than any diverging scale's centre)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    """plt.subplots with the width capped at MAX_WIDTH_IN; axes always a 2-D array."""
    kwargs.setdefault("layout", "constrained")   # makes room for colour bars, legends and titles inside the figure
    return pyplot().subplots(nrows, ncols, figsize=(min(width, MAX_WIDTH_IN), height), squeeze=False, **kwargs)


def finish(fig):
    """Raise every text of the figure (tick labels included, also when redrawn) to at least MIN_FONT_PT."""
    from matplotlib.text import Text
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks = axis.get_major_ticks()
            if ticks and ticks[0].label1.get_fontsize() < TICK_PT:
                axis.set_tick_params(which="both", labelsize=TICK_PT)
    for text in fig.findobj(Text):
        if text.get_fontsize() < MIN_FONT_PT:
            text.set_fontsize(MIN_FONT_PT)
    return fig


def wrap_title(text: str, width_in: float, size_pt: float = 10) -> str:
    """Break a title into lines that fit width_in inches at size_pt (about 0.55 em per character)."""
    return "\n".join(textwrap.wrap(text, max(12, int(width_in * 72 / (0.55 * size_pt)))))


def value(row: dict, key: str) -> float:
    """A table cell as a float: NaN for a missing key, None, '' or a note (rows read back from CSV)."""
    try:
        return float(row.get(key, np.nan))
    except (TypeError, ValueError):
        return float("nan")


def mean_ci(values, ci: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of the finite values and its t-based CI (the unit: whatever the values are, e.g. subjects)."""
    from scipy import stats
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if not x.size:
        return np.nan, np.nan, np.nan, 0
    if x.size < 2:
        return float(x[0]), np.nan, np.nan, 1
    half = stats.t.ppf(0.5 + ci / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half), int(x.size)


def text_colour_on(rgba) -> str:
    """Black or white, whichever contrasts more with the colour (WCAG relative luminance)."""
    channels = np.asarray(rgba[:3], dtype=float)
    linear = np.where(channels <= 0.03928, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    return "black" if float(linear @ [0.2126, 0.7152, 0.0722]) > 0.179 else "white"


def ordered_rois(names) -> list[str]:
    """The distinct ROI names in the challenge's order (families together)."""
    names = set(names)
    return [r for r in utils.ROI_NAMES if r in names]


def subject_label(subject) -> str:
    return paths.subject_dir_name(int(subject))


def family_separators(ax, rois, axis: str = "y", colour: str = "black"):
    """Thin lines between ROI families along a heatmap's rows (axis='y') or columns ('x')."""
    families = [utils.ROI_FAMILY_OF.get(r, "") for r in rois]
    for k in range(1, len(rois)):
        if families[k] != families[k - 1]:
            (ax.axhline if axis == "y" else ax.axvline)(k - 0.5, color=colour, lw=0.8)


def heatmap(ax, matrix, row_labels, col_labels, cmap, norm, numbers: str | None = None, marks=None,
            number_size: float = MIN_FONT_PT):
    """Cells coloured by norm(matrix) (NaN grey); numbers: a format for each cell's value, drawn in black or white
    from the cell's luminance; marks: a bool matrix of cells that get a dot (e.g. CI excludes 0)."""
    import matplotlib
    cmap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    cmap = cmap.with_extremes(bad=MISSING)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    rows, cols = np.nonzero(np.isfinite(matrix))
    if numbers:
        for i, j in zip(rows, cols):
            ax.text(j, i, numbers.format(matrix[i, j]), ha="center", va="center", fontsize=number_size,
                    color=text_colour_on(cmap(norm(matrix[i, j]))))
    if marks is not None:
        i, j = np.nonzero(np.asarray(marks) & np.isfinite(matrix))
        if len(i):
            colours = [text_colour_on(cmap(norm(matrix[a, b]))) for a, b in zip(i, j)]
            ax.scatter(j, i, s=6, c=colours, marker="o", linewidths=0)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.tick_params(length=2)
    return image


def colour_bar_shrink(fig) -> float:
    """A colour bar's length as a fraction of the figure's height: about 4.5 inches, the full height of a small one."""
    return float(min(1.0, 4.5 / fig.get_figheight()))


def symmetric_norm(values, centre: float = 0.0, quantile: float = 98):
    """A colour norm centred on `centre`, its half-range the quantile of |values - centre| (robust to outliers)."""
    from matplotlib.colors import Normalize
    deviation = np.abs(np.asarray(values, dtype=float) - centre)
    deviation = deviation[np.isfinite(deviation)]
    half = float(np.percentile(deviation, quantile)) if deviation.size else 1.0
    half = half if half > 0 else 1.0
    return Normalize(centre - half, centre + half)


# ---- per-ROI accuracy of one subject and hemisphere, one panel per ROI family ----

def _family_layout(rois) -> list[list[str]]:
    """The families of these ROIs in one row (<= 12 ROIs) or two rows of about equal ROI counts."""
    families = [f for f in utils.ROI_FAMILIES if any(utils.ROI_FAMILY_OF[r] == f for r in rois)]
    if len(rois) <= 12:
        return [families]
    counts = np.cumsum([sum(utils.ROI_FAMILY_OF[r] == f for r in rois) for f in families])
    split = int(np.argmin(np.abs(counts - counts[-1] / 2))) + 1
    return [families[:split], families[split:]]


def _family_axes(rois, panel_height: float = 2.6):
    """A figure with one panel per ROI family, each ROI the same width; -> fig, {family: (ax, its ROIs)}."""
    layout = _family_layout(rois)
    per_family = {f: [r for r in rois if utils.ROI_FAMILY_OF[r] == f] for row in layout for f in row}
    width = max(1, max(sum(len(per_family[f]) for f in row) for row in layout))
    plt = pyplot()
    fig = plt.figure(figsize=(min(max(6.0, 2.0 + 0.62 * width + 0.3 * max(map(len, layout))), 20.0),
                              1.0 + panel_height * len(layout)), layout="constrained")
    grid = fig.add_gridspec(len(layout), width)
    panels = {}
    for i, row in enumerate(layout):
        start = 0
        for family in row:
            n = len(per_family[family])
            panels[family] = (fig.add_subplot(grid[i, start:start + n]), per_family[family])
            start += n
    return fig, panels


def _draw_points(ax, x, centre, low, high, feature_set, marker="o"):
    """Each set's points and its CIs as vertical lines (a percentile CI of a median need not contain it)."""
    colour = fsets.colour(feature_set)
    finite = np.isfinite(low) & np.isfinite(high)
    ax.vlines(np.asarray(x)[finite], np.asarray(low)[finite], np.asarray(high)[finite], color=colour, lw=1.2,
              gid=f"{feature_set}_ci")
    ax.plot(x, centre, marker, ls="", ms=4, color=colour, mec="black", mew=0.3, gid=feature_set,
            label=fsets.label(feature_set))


def accuracy_figure(entries: dict, sets, rois, title: str, ylabel: str, note: str):
    """One panel per ROI family, each set's point and CI per ROI. entries: {(set, roi): (centre, low, high)}."""
    fig, panels = _family_axes(rois)
    width = 0.8 / max(len(sets), 1)
    numbers = np.array([v for e in entries.values() for v in e], dtype=float)
    numbers = numbers[np.isfinite(numbers)]
    limits = (min(0.0, numbers.min()), numbers.max()) if numbers.size else (0.0, 1.0)
    pad = 0.05 * (limits[1] - limits[0] or 1)
    for k, (family, (ax, members)) in enumerate(panels.items()):
        for m, s in enumerate(sets):
            x = np.arange(len(members)) + (m - (len(sets) - 1) / 2) * width
            c, lo, hi = (np.array([entries.get((s, r), (np.nan,) * 3)[i] for r in members]) for i in range(3))
            _draw_points(ax, x, c, lo, hi, s)
        ax.set_xticks(range(len(members)), members, rotation=45 if len(members) > 3 else 0, ha="right"
                      if len(members) > 3 else "center")
        ax.set_xlim(-0.6, len(members) - 0.4)
        ax.set_ylim(limits[0] - pad, limits[1] + pad)
        ax.axhline(0, color="black", lw=0.5)
        ax.grid(axis="y", lw=0.3)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("ROI", fontsize=9)
        if ax.get_subplotspec().colspan.start != 0:
            ax.tick_params(labelleft=False)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="-", color=fsets.colour(s), label=fsets.label(s)) for s in sets]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.supylabel(ylabel.replace("\n", " "), fontsize=10)  # once for all rows: a label per row overlaps the next
    fig.suptitle(wrap_title(f"{title} ({note})", fig.get_figwidth()), fontsize=10)
    return finish(fig)


def plot_roi_accuracy(rows: list[dict], feature_sets, title: str, statistic: str = "median"):
    """One subject and hemisphere: each set's median (or mean) test r per ROI with its 95% bootstrap CI over test
    images (columns <stat>_r_<set>_ci_low/_ci_high), one panel per ROI family."""
    rois = ordered_rois(r["roi"] for r in rows)
    sets = [s for s in feature_sets if any(np.isfinite(value(r, f"{statistic}_r_{s}")) for r in rows)]
    entries = {(s, r["roi"]): tuple(value(r, f"{statistic}_r_{s}{end}") for end in ("", "_ci_low", "_ci_high"))
               for r in rows for s in sets}
    return accuracy_figure(entries, sets, rois, title, f"{statistic} Pearson r over the ROI's voxels\n(test split)",
                            "lines: 95% bootstrap CI over test images; gaps: no voxels or no model")


# ---- layer search ----

def plot_layer_roi_heatmap(scores: np.ndarray, layers, rois, title: str, statistic: str = "median"):
    """Layers x ROIs heatmap of the search's val r (one column per ROI, families separated), the best layer of
    each ROI outlined; readable at 31 ROIs."""
    from matplotlib.colors import Normalize
    plt = pyplot()
    scores = np.asarray(scores, dtype=float)
    fig, axes = new_figure(2.5 + 0.32 * len(rois), 1.6 + 0.3 * len(layers))
    ax = axes[0, 0]
    finite = scores[np.isfinite(scores)]
    norm = Normalize(*(np.percentile(finite, [1, 100]) if finite.size else (0, 1)))
    image = heatmap(ax, scores, list(layers), list(rois), "viridis", norm)
    for j in range(scores.shape[1]):
        if np.isfinite(scores[:, j]).any():
            i = int(np.nanargmax(scores[:, j]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    family_separators(ax, list(rois), "x")
    ax.set_xlabel("ROI (grey: no voxels; lines separate ROI families)")
    ax.set_ylabel("AlexNet layer")
    ax.set_title(wrap_title(title + " (red outline: chosen layer)", fig.get_figwidth()))
    fig.colorbar(image, ax=ax, label=f"val Pearson r ({statistic} over the ROI's voxels)", shrink=0.9)
    return finish(fig)


# ---- cross-subject transfer ----

def plot_transfer_matrix(matrix: np.ndarray, subjects, title: str, colorbar_label: str, centre: float | None = None):
    """Annotated source x target heatmap (rows: the backbone's subject, columns: the encoded subject; diagonal
    outlined). centre: a diverging scale centred there (50 for '% of voxels improved'), else sequential."""
    from matplotlib.colors import Normalize
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    n = len(subjects)
    fig, axes = new_figure(2.6 + 0.62 * n, 1.6 + 0.55 * n)
    ax = axes[0, 0]
    finite = matrix[np.isfinite(matrix)]
    if centre is not None:
        norm, cmap = symmetric_norm(finite, centre, 100), "RdBu_r"
    else:
        norm, cmap = Normalize(*((finite.min(), finite.max()) if finite.size else (0, 1))), "viridis"
    big = np.nanmax(np.abs(finite)) >= 10 if finite.size else False
    names = [subject_label(s) for s in subjects]
    image = heatmap(ax, matrix, names, names, cmap, norm, numbers="{:.1f}" if big else "{:.2f}", number_size=8)
    for k in range(n):
        ax.add_patch(plt.Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.2))
    ax.set_xlabel("encoded subject (target)")
    ax.set_ylabel("backbone tuned on subject (source)")
    ax.set_title(wrap_title(title, fig.get_figwidth() - 1.2), fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label + (f" (centred on {centre:g})" if centre is not None else ""))
    return finish(fig)


# ---- pooled backbones without the encoded subject; linear probes ----

def _strip(ax, x: float, values, colour, markers, units, width: float = 0.3, seed: int = 0):
    """Jittered dots (marker per hemisphere) and, as a black bar, the mean over units (subjects; each unit's values
    averaged first) with a 95% t CI."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=float)
    jitter = rng.uniform(-width / 2, width / 2, len(values))
    for marker in dict.fromkeys(markers):
        keep = np.array([m == marker for m in markers])
        ax.plot(x + jitter[keep], values[keep], marker, ls="", ms=3.5, color=colour, alpha=0.75, mec="none")
    per_unit = [np.nanmean(values[[u == unit for u in units]]) for unit in dict.fromkeys(units)]
    mean, low, high, _ = mean_ci(per_unit)
    if np.isfinite(mean):
        ax.errorbar(x + width / 2 + 0.08, mean, yerr=[[mean - low], [high - mean]] if np.isfinite(low) else None,
                    fmt="_", ms=8, color="black", capsize=2, lw=1.2)


def plot_leave_one_subject_out(rows: list[dict]):
    """Per pooled set and ROI: a pooled backbone trained WITHOUT the encoded subject, minus the untuned model and
    minus the pooled backbone trained with the subject; one dot per subject and hemisphere, mean and 95% CI."""
    sets = list(dict.fromkeys(r["feature_set"] for r in rows))
    rois = ordered_rois(r["roi"] for r in rows)
    contrasts = [("untuned", "untuned"), ("with_subject", "pooled trained WITH the subject")]
    panels = [(s, c) for s in sets for c in contrasts]
    fig, axes = new_figure(2.5 + 0.36 * len(rois), 0.8 + 2.3 * len(panels), nrows=max(len(panels), 1), sharex=True)
    for ax, (pooled, (baseline, text)) in zip(axes[:, 0], panels):
        for x, roi in enumerate(rois):
            members = [r for r in rows if r["feature_set"] == pooled and r["roi"] == roi]
            diffs = [value(r, "median_r_without_subject") - value(r, f"median_r_{baseline}") for r in members]
            _strip(ax, x, diffs, fsets.colour(pooled), [HEMI_MARKERS.get(r["hemisphere"], "o") for r in members],
                   [r["subject"] for r in members], seed=x)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{fsets.label(pooled)} trained WITHOUT the encoded subject minus {text}", fontsize=9,
                     loc="left")
        ax.set_ylabel("median test r difference\n(Pearson r)")
        ax.grid(axis="y", lw=0.3)
    axes[-1, 0].set_xticks(range(len(rois)), rois, rotation=90)
    axes[-1, 0].set_xlim(-0.6, len(rois) - 0.4)
    axes[-1, 0].set_xlabel("ROI (dots: subjects, o lh / s rh; bar: mean and 95% t CI over subjects)")
    fig.suptitle("Leave-one-subject-out: pooled backbones on a subject they never saw (test split)", fontsize=10)
    return finish(fig)


def plot_probe_bars(rows: list[dict], title: str, rois_per_row: int = 16):
    """Linear-probe accuracy per backbone ROI and tuned set: one dot per subject and hemisphere (pooled: one per
    hemisphere), mean and 95% t CI over subjects; the untuned backbone and chance as lines. Readable with dozens of
    backbones: at most rois_per_row ROIs per panel row."""
    from matplotlib.lines import Line2D
    tuned = [r for r in rows if r["method"] != "untuned"]
    methods = list(dict.fromkeys(r["method"] for r in tuned))
    rois = ordered_rois(r["roi"] for r in tuned)
    chunks = [rois[i:i + rois_per_row] for i in range(0, len(rois), rois_per_row)] or [[]]
    fig, axes = new_figure(3.0 + 0.3 * max(map(len, chunks)) * max(len(methods), 1), 1.0 + 3.0 * len(chunks),
                           nrows=len(chunks), sharey=True)
    width = 0.8 / max(len(methods), 1)
    untuned = [100 * value(r, "accuracy") for r in rows if r["method"] == "untuned"]
    chance = 100 * value(rows[0], "chance") if rows else np.nan
    for ax, chunk in zip(axes[:, 0], chunks):
        for m, method in enumerate(methods):
            for x, roi in enumerate(chunk):
                members = [r for r in tuned if r["method"] == method and r["roi"] == roi]
                if members:
                    _strip(ax, x + (m - (len(methods) - 1) / 2) * width,
                           [100 * value(r, "accuracy") for r in members], fsets.colour(method),
                           [HEMI_MARKERS.get(r["hemisphere"], "o") for r in members],
                           [r["subject"] for r in members], width=0.6 * width, seed=x)
        for level in untuned:
            ax.axhline(level, color="black", ls="--", lw=1)
        if np.isfinite(chance):
            ax.axhline(chance, color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(chunk)), chunk, rotation=90 if len(chunk) > 8 else 0)
        ax.set_xlim(-0.6, max(len(chunk), 1) - 0.4)
        ax.set_xlabel("ROI the backbone was tuned on")
        ax.set_ylabel("linear-probe test accuracy (%)")
        ax.grid(axis="y", lw=0.3)
    handles = [Line2D([], [], color=fsets.colour(m), marker="o", ls="", label=fsets.label(m)) for m in methods]
    handles += [Line2D([], [], color="black", ls="--", label="untuned AlexNet")] if untuned else []
    handles += [Line2D([], [], color="grey", ls=":", label="chance (largest class)")] if np.isfinite(chance) else []
    handles += [Line2D([], [], color="black", marker="_", ls="", ms=8, label="mean, 95% t CI over subjects")]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=len(handles))
    fig.suptitle(wrap_title(f"{title} (dots: backbones of each subject, o lh / s rh)", fig.get_figwidth()),
                 fontsize=10)
    return finish(fig)


# ---- retrieval and the submission's candidates: ROI x subject heatmaps ----

def _subject_columns(rows) -> list[tuple[int, str]]:
    return sorted({(int(r["subject"]), r["hemisphere"]) for r in rows}, key=lambda k: (k[0], k[1]))


def panel_grid(n_panels: int, per_row: int, panel_w: float, panel_h: float, extra_w: float = 2.5, **kwargs):
    """A figure of n_panels panels, per_row to a row (unused cells hidden); -> fig, the panels' axes."""
    ncols = min(per_row, max(n_panels, 1))
    nrows = -(-max(n_panels, 1) // ncols)
    panel_w, panel_h = max(panel_w, 2.0), max(panel_h, 2.4)   # room for labels when there are few rows or columns
    fig, axes = new_figure(extra_w + ncols * panel_w, 1.2 + nrows * panel_h, nrows=nrows, ncols=ncols, **kwargs)
    for ax in axes.ravel()[n_panels:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n_panels]


def plot_retrieval(rows: list[dict], feature_sets):
    """Top-1 fMRI -> image retrieval among the test candidates (300, or all when fewer) of each contrastive set:
    ROI x subject heatmaps per set and hemisphere; chance marked on the colour bar; * where the 95% bootstrap CI
    lies above chance."""
    from matplotlib.colors import Normalize
    entries = {}
    for r in rows:
        for s in feature_sets:
            key = next((k for k in r if k.startswith("top1_of_") and k.endswith(f"_{s}")
                        and not k.startswith("top1_of_all")), None)
            if key is not None and np.isfinite(value(r, key)):
                entries[(s, r["hemisphere"], r["roi"], int(r["subject"]))] = (
                    100 * value(r, key), 100 * value(r, f"{key}_ci_low"),
                    100 * value(r, "chance_" + key[:-len(s) - 1]), 100 * value(r, f"control_{key}"))
    sets = [s for s in feature_sets if any(k[0] == s for k in entries)]
    hemis = [h for h in utils.HEMISPHERES if any(k[1] == h for k in entries)]
    panels = [(s, h) for s in sets for h in hemis]
    rois = ordered_rois(k[2] for k in entries)
    subjects = sorted({k[3] for k in entries})
    fig, axes = panel_grid(len(panels), 4, 0.5 + 0.36 * len(subjects), 0.8 + 0.2 * len(rois), sharey=True)
    values = np.array([e[0] for e in entries.values()]) if entries else np.zeros(1)
    chances = np.array([e[2] for e in entries.values()]) if entries else np.full(1, np.nan)
    norm = Normalize(0, max(float(np.nanmax(values)), 1.05 * float(np.nanmax(chances, initial=0)), 1e-9))
    image = None
    for ax, (s, hemi) in zip(axes, panels):
        matrix = np.full((len(rois), len(subjects)), np.nan)
        above = np.zeros_like(matrix, dtype=bool)
        for (s2, h2, roi, subject), (v, low, chance, _) in entries.items():
            if (s2, h2) == (s, hemi):
                i, j = rois.index(roi), subjects.index(subject)
                matrix[i, j], above[i, j] = v, low > chance
        image = heatmap(ax, matrix, rois, [subject_label(x) for x in subjects], "viridis", norm)
        for i, j in zip(*np.nonzero(np.isfinite(matrix))):
            ax.text(j, i, f"{matrix[i, j]:.1f}" + ("*" if above[i, j] else ""), ha="center", va="center",
                    fontsize=MIN_FONT_PT, color=text_colour_on(image.cmap(norm(matrix[i, j]))))
        family_separators(ax, rois)
        ax.set_title(f"{fsets.label(s)}, {hemi}", fontsize=9)
        ax.set_xlabel("encoded subject")
        if ax.get_subplotspec().colspan.start == 0:
            ax.set_ylabel("ROI")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), label="top-1 retrieval (% of test queries)",
                           shrink=colour_bar_shrink(fig))
        for chance in np.unique(chances[np.isfinite(chances)]):
            bar.ax.axhline(chance, color="red", lw=2)
            bar.ax.annotate("chance", (0, chance), xycoords=("axes fraction", "data"), xytext=(-3, 0),
                            textcoords="offset points", ha="right", va="center", color="red", fontsize=8)
        chance_text = ", ".join(f"{c:.2g}%" for c in np.unique(chances[np.isfinite(chances)]))
        control = np.nanmedian([e[3] for e in entries.values()])
        fig.suptitle(wrap_title(f"fMRI -> image top-1 retrieval among the test candidates (red line on the colour "
                                f"bar: chance {chance_text}; shuffled-fMRI control, median {control:.2g}%; "
                                "*: 95% CI above chance)", fig.get_figwidth() - 1.5), fontsize=10)
    return finish(fig)


def plot_candidate_shares(rows: list[dict], kinds):
    """Which candidate each vertex's submitted prediction uses (chosen by val r): per kind, a heatmap of the
    % of vertices choosing it, rows 'all vertices' and the ROIs, columns subject x hemisphere."""
    from matplotlib.colors import Normalize
    columns = _subject_columns(rows)
    names = ["all vertices"] + ordered_rois(r["vertices"] for r in rows)
    shown = [k for k in kinds if any(f"pct_{k}" in r for r in rows)]
    fig, axes = panel_grid(len(shown), 3, 0.5 + 0.24 * len(columns), 0.8 + 0.2 * len(names), sharey=True)
    norm = Normalize(0, 100)
    image = None
    for ax, kind in zip(axes, shown):
        matrix = np.full((len(names), len(columns)), np.nan)
        for r in rows:
            key = (int(r["subject"]), r["hemisphere"])
            if r["vertices"] in names and key in columns:
                matrix[names.index(r["vertices"]), columns.index(key)] = value(r, f"pct_{kind}")
        image = heatmap(ax, matrix, names, [f"{subject_label(s)} {h}" for s, h in columns], "magma", norm)
        ax.axhline(0.5, color="white", lw=2)
        family_separators(ax, names, colour="white")
        ax.set_title(fsets.label(kind), fontsize=9)
        ax.set_xlabel("subject, hemisphere")
        if ax.get_subplotspec().colspan.start == 0:
            ax.set_ylabel("vertices (all, or an ROI's)")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="vertices choosing the candidate (%)", shrink=colour_bar_shrink(fig))
    fig.suptitle("Which feature set each vertex's submitted prediction uses (chosen by val r)", fontsize=10)
    return finish(fig)
