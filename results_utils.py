"""Result tables and statistics: per-ROI summaries, % of voxels improved, paired tests, bootstrap CIs, group tables."""
from __future__ import annotations

import warnings

import numpy as np

import encoding
import utils
from study import EncodingStudy, load_best_layers

def roi_summary(r_by_method: dict, roi_indices: dict, baseline: str | None = None) -> list[dict]:
    """One row per (ROI, method): n voxels, n valid, mean and median r, % voxels improved over baseline.

    r_by_method: method -> per-voxel r over all of a hemisphere's voxels; roi_indices: ROI -> voxel
    indices (utils.roi_voxel_indices). Empty ROIs give n_voxels 0 and NaN statistics. pct_improved:
    100 * fraction of voxels (finite in both) where the method's r > the baseline's; NaN for the baseline.
    """
    if baseline is not None and baseline not in r_by_method:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {list(r_by_method)}")
    arrays = {m: np.asarray(r, dtype=np.float64).ravel() for m, r in r_by_method.items()}
    sizes = {a.size for a in arrays.values()}
    if len(sizes) > 1:
        raise utils.DataError(f"per-voxel r arrays of different lengths {sorted(sizes)}: expected one value "
                              "per hemisphere voxel for every method")
    n_total = sizes.pop() if sizes else 0
    rows = []
    for roi, idx in roi_indices.items():
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= n_total):
            raise utils.DataError(f"ROI {roi}: voxel index {int(idx.max())} out of range for {n_total} voxels")
        base = arrays[baseline][idx] if baseline is not None else None
        for method, r_all in arrays.items():
            r = r_all[idx]
            finite = r[np.isfinite(r)]
            row = {"roi": roi, "group": utils.roi_group(roi), "method": method, "n_voxels": int(idx.size),
                   "n_valid": int(finite.size),
                   "mean_r": float(finite.mean()) if finite.size else float("nan"),
                   "median_r": float(np.median(finite)) if finite.size else float("nan"),
                   "pct_improved": float("nan")}
            if base is not None and method != baseline:
                row["pct_improved"] = percent_improved(r, base)
            rows.append(row)
    return rows


def group_summary(roi_rows: list[dict]) -> list[dict]:
    """Per method and group (Early, Higher, Anatomical, All): the mean of per-ROI median r over non-empty ROIs.

    As in the paper's table; 'All' is every ROI in roi_rows. A group with no usable ROI gives NaN.
    """
    methods = list(dict.fromkeys(row["method"] for row in roi_rows))
    groups = {**{g: set(rois) for g, rois in utils.ROI_GROUPS.items()}, "All": None}
    out = []
    for method in methods:
        for group, members in groups.items():
            medians = [row["median_r"] for row in roi_rows if row["method"] == method
                       and (members is None or row["roi"] in members) and np.isfinite(row["median_r"])]
            out.append({"group": group, "method": method, "n_rois": len(medians),
                        "mean_of_roi_medians": float(np.mean(medians)) if medians else float("nan")})
    return out


def paired_wilcoxon(r_a, r_b) -> dict:
    """Wilcoxon signed-rank test (scipy, two-sided) of per-voxel r_a vs r_b over voxels finite in both."""
    from scipy.stats import wilcoxon
    r_a = np.asarray(r_a, dtype=np.float64).ravel()
    r_b = np.asarray(r_b, dtype=np.float64).ravel()
    if r_a.shape != r_b.shape:
        raise ValueError(f"paired_wilcoxon: {r_a.shape} vs {r_b.shape} voxels")
    both = np.isfinite(r_a) & np.isfinite(r_b)
    diff = r_a[both] - r_b[both]
    out = {"n": int(both.sum()), "statistic": float("nan"), "pvalue": float("nan"),
           "median_diff": float(np.median(diff)) if diff.size else float("nan"),
           "mean_diff": float(diff.mean()) if diff.size else float("nan")}
    if np.any(diff != 0):
        res = wilcoxon(r_a[both], r_b[both])
        out["statistic"], out["pvalue"] = float(res.statistic), float(res.pvalue)
    return out


def bootstrap_median_r_diff(y_true, pred_a, pred_b, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                            voxel_chunk: int = 1024, progress: bool = False) -> dict:
    """Bootstrap over test images of median_voxels(r_a) - median_voxels(r_b), with a percentile CI.

    Each resample draws the test rows with replacement (seeded) and recomputes every voxel's r for
    both methods from the predictions and the truth. Vectorised: a resample is a vector of row counts,
    so its weighted sums for all resamples are one float64 matmul per voxel chunk.
    Returns observed, ci_low, ci_high, boot_diffs (n_boot), n_boot, seed, ci.
    """
    y = np.asarray(y_true)
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if not (y.shape == a.shape == b.shape) or y.ndim != 2:
        raise ValueError(f"bootstrap: y_true {y.shape}, pred_a {a.shape}, pred_b {b.shape} must be equal 2-D shapes")
    n, v = y.shape
    observed = float(np.nanmedian(encoding.pearson_r(y, a)) - np.nanmedian(encoding.pearson_r(y, b)))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=(n_boot, n))
    counts = np.bincount((rows + n * np.arange(n_boot)[:, None]).ravel(),
                         minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    r_a = np.empty((n_boot, v), dtype=np.float32)
    r_b = np.empty((n_boot, v), dtype=np.float32)
    starts = range(0, v, voxel_chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="bootstrap voxel chunks", unit="chunk")
    for start in starts:
        cols = slice(start, start + voxel_chunk)
        blocks = []
        for m in (y, a, b):
            blk = np.asarray(m[:, cols], dtype=np.float64)
            blocks.append(blk - blk.mean(0))   # centring first keeps sum-of-squares differences accurate
        yc, ac, bc = blocks
        constant = [(np.asarray(m[:, cols]).max(0) == np.asarray(m[:, cols]).min(0)) for m in (y, a, b)]
        vc = yc.shape[1]
        sums = counts @ np.concatenate([yc, ac, bc, yc * yc, ac * ac, bc * bc, yc * ac, yc * bc], axis=1)
        s_y, s_a, s_b, s_yy, s_aa, s_bb, s_ya, s_yb = (sums[:, i * vc:(i + 1) * vc] for i in range(8))
        var_y = n * s_yy - s_y * s_y
        with np.errstate(invalid="ignore", divide="ignore"):
            for out, s_p, s_pp, s_yp, const_p in ((r_a, s_a, s_aa, s_ya, constant[1]),
                                                  (r_b, s_b, s_bb, s_yb, constant[2])):
                r = (n * s_yp - s_y * s_p) / np.sqrt(var_y * (n * s_pp - s_p * s_p))
                # a resample of one repeated row is constant: its variance is rounding noise, not 0
                r[(var_y <= 1e-12 * np.abs(n * s_yy)) | ((n * s_pp - s_p * s_p) <= 1e-12 * np.abs(n * s_pp))] = np.nan
                r[:, constant[0] | const_p] = np.nan
                out[:, cols] = np.clip(r, -1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resample rows -> NaN diff
        diffs = np.nanmedian(r_a, axis=1) - np.nanmedian(r_b, axis=1)
    tail = 100 * (1 - ci) / 2
    low, high = np.nanpercentile(diffs, [tail, 100 - tail])
    return {"observed": observed, "ci_low": float(low), "ci_high": float(high), "boot_diffs": diffs,
            "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci)}


# -- Encoding core: synthetic data and timing helpers (benchmark.py, tests) --


SINGLE_SUBJ_COLUMNS = ["roi", "group", "n_voxels", "layer_untuned", "layer_reg", "layer_cl",
                       "median_r_untuned", "median_r_reg", "median_r_cl",
                       "pct_improved_cl_vs_untuned", "pct_improved_cl_vs_reg", "wilcoxon_p_cl_vs_untuned",
                       "ci95_median_diff_cl_vs_untuned", "wilcoxon_p_cl_vs_reg", "ci95_median_diff_cl_vs_reg"]


def single_subject_rows(study: EncodingStudy, subject: int, hemi: str, rois, n_bootstrap: int = 1000,
                        seed: int = 0):
    """Per-ROI rows (median/mean r per method, % voxels improved, statistics), per-voxel r, and
    {method: ROIs without a model}.

    Rows are wide (one column per method and statistic); long rows for group_summary come from
    long_rows(). Methods without a model give NaN cells; empty ROIs give a row with n_voxels 0.
    """
    rows, voxel_r, missing = [], {}, {}
    d = study.subject(subject)
    best = load_best_layers(study.out_dir, subject, hemi)
    for roi in rois:
        idx = d.roi_voxel_indices[hemi][roi]
        row = {"subject": subject, "hemisphere": hemi, "roi": roi, "group": utils.roi_group(roi), "n_voxels": len(idx),
               "layer_untuned": best.get(roi, "")}
        if not len(idx):
            rows.append({**row, "note": "empty ROI"})
            continue
        fits = {"untuned": study.untuned(subject, hemi, roi),
                "reg": study.tuned("reg", subject, subject, hemi, roi),
                "cl": study.tuned("cl", subject, subject, hemi, roi)}
        for m in (m for m, fit in fits.items() if fit is None):
            missing.setdefault(m, []).append(roi)
        for m in ("reg", "cl"):
            row[f"layer_{m}"] = study.tuned_layer_of(m, subject, hemi, roi) if fits[m] is not None else ""
        r = {m: (fit[1] if fit is not None else np.full(len(idx), np.nan)) for m, fit in fits.items()}
        voxel_r[roi] = np.stack([r["untuned"], r["reg"], r["cl"]]).astype(np.float32)
        whole_roi = {roi: np.arange(len(idx))}
        for baseline in ("untuned", "reg"):
            for s in roi_summary(r, whole_roi, baseline=baseline):
                row[f"median_r_{s['method']}"], row[f"mean_r_{s['method']}"] = s["median_r"], s["mean_r"]
                row[f"nan_voxels_{s['method']}"] = s["n_voxels"] - s["n_valid"]
                if s["method"] != baseline:
                    row[f"pct_improved_{s['method']}_vs_{baseline}"] = s["pct_improved"]
        row.pop("pct_improved_untuned_vs_reg", None)
        ceiling = d.noise_ceiling.get(hemi)
        if ceiling is not None:
            for m in (m for m, fit in fits.items() if fit is not None):
                row[f"median_noise_normalized_{m}"] = float(np.nanmedian(encoding.noise_normalized(r[m], ceiling[idx])))
        truth = study.test_truth(subject, hemi, roi)
        for other in ("untuned", "reg"):
            if fits["cl"] is not None and fits[other] is not None:
                row[f"wilcoxon_p_cl_vs_{other}"] = paired_wilcoxon(r["cl"], r[other])["pvalue"]
                boot = bootstrap_median_r_diff(truth, fits["cl"][0], fits[other][0], n_bootstrap, seed)
                row[f"median_diff_cl_vs_{other}"] = boot["observed"]
                row[f"ci95_median_diff_cl_vs_{other}"] = f"[{boot['ci_low']:.3f}, {boot['ci_high']:.3f}]"
        rows.append(row)
    return rows, voxel_r, missing


def long_rows(rows: list[dict], methods=("untuned", "reg", "cl")) -> list[dict]:
    """Wide single-subject rows -> one row per (ROI, method) with median_r, as group_summary expects.

    Only ROIs where every method has a score enter, so group averages compare methods on the same ROIs.
    """
    complete = [r for r in rows if r["n_voxels"]
                and all(np.isfinite(float(r.get(f"median_r_{m}", np.nan))) for m in methods)]
    return [{"roi": r["roi"], "method": m, "median_r": r[f"median_r_{m}"]} for r in complete for m in methods]


def percent_improved(r_new, r_base) -> float:
    """% of voxels (finite in both) where r_new > r_base; NaN when none is comparable."""
    r_new, r_base = np.asarray(r_new, dtype=float), np.asarray(r_base, dtype=float)
    both = np.isfinite(r_new) & np.isfinite(r_base)
    return float(100.0 * (r_new[both] > r_base[both]).mean()) if both.any() else float("nan")


def off_diagonal_mean(matrix: np.ndarray) -> float:
    """Mean of the finite off-diagonal cells (transfer to other subjects)."""
    off = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")


def cross_subject_matrices(study: EncodingStudy, subjects, hemi: str, roi: str, method: str):
    """Source x target matrices: median test r, and % of target voxels beating the target's untuned model."""
    n = len(subjects)
    median_r = np.full((n, n), np.nan)
    improved = np.full((n, n), np.nan)
    for j, target in enumerate(subjects):
        base = study.untuned(target, hemi, roi) if len(study.subject(target).roi_voxel_indices[hemi][roi]) else None
        for i, source in enumerate(subjects):
            res = study.tuned(method, source, target, hemi, roi)
            if res is None:
                continue
            median_r[i, j] = np.nanmedian(res[1])
            if base is not None:
                improved[i, j] = percent_improved(res[1], base[1])
    return median_r, improved



def group_table(rows: list[dict], methods=("untuned", "reg", "cl")) -> list[dict]:
    """The paper's table: per group (Early / Higher / Anatomical / All) the mean over ROIs of median test r
    for each method (ROIs with all methods only), and the mean % of voxels where CL beats untuned and reg."""
    long = group_summary(long_rows(rows, methods))
    table = []
    for group in list(utils.ROI_GROUPS) + ["All"]:
        entry = {"group": group}
        for m in methods:
            cell = next((g for g in long if g["group"] == group and g["method"] == m), None)
            entry[m] = cell["mean_of_roi_medians"] if cell else np.nan
            entry["n_rois"] = max(entry.get("n_rois", 0), cell["n_rois"] if cell else 0)
        for other in ("untuned", "reg"):
            vals = [r.get(f"pct_improved_cl_vs_{other}", np.nan) for r in rows
                    if r["n_voxels"] and (group == "All" or r["group"] == group)]
            vals = np.asarray(vals, dtype=float)
            entry[f"% voxels CL > {other}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else np.nan
        table.append(entry)
    return table
