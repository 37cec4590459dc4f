"""Result tables: per-ROI summaries, % of voxels improved, group tables; their statistics come from significance.py."""
from __future__ import annotations

import numpy as np

import encoding
import significance
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
    """Descriptive only, never a p-value for a comparison: Wilcoxon signed-rank statistic of per-voxel r_a vs r_b.

    Voxels are not independent samples (neighbours share noise), so its 'pvalue' overstates the evidence;
    tables report significance.permutation_test_r_diff (over test images) instead.
    """
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
    """The median part of significance.bootstrap_r_diff under its old keys (observed, ci_low, ci_high, boot_diffs)."""
    boot = significance.bootstrap_r_diff(y_true, pred_a, pred_b, n_boot, seed, ci, voxel_chunk, progress)
    return {"observed": boot["median_diff"], "ci_low": boot["median_ci_low"], "ci_high": boot["median_ci_high"],
            "boot_diffs": boot["median_boot_diffs"], "n_boot": boot["n_boot"], "seed": boot["seed"], "ci": boot["ci"]}


# -- Encoding core: synthetic data and timing helpers (benchmark.py, tests) --


SINGLE_SUBJ_COLUMNS = ["roi", "group", "n_voxels", "layer_untuned", "layer_reg", "layer_cl",
                       "median_r_untuned", "median_r_reg", "median_r_cl",
                       "pct_improved_cl_vs_untuned", "pct_improved_cl_vs_reg", "perm_p_median_cl_vs_untuned",
                       "ci95_median_diff_cl_vs_untuned", "perm_p_median_cl_vs_reg", "ci95_median_diff_cl_vs_reg"]


def single_subject_rows(study: EncodingStudy, subject: int, hemi: str, rois, n_bootstrap: int = 1000,
                        seed: int = 0, n_permutations: int = 1000):
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
                row[f"median_challenge_score_{m}"] = float(np.nanmedian(encoding.challenge_score(r[m], ceiling[idx])))
        truth = study.test_truth(subject, hemi, roi)
        for other in ("untuned", "reg"):
            if fits["cl"] is not None and fits[other] is not None:
                # over test images, not voxels: a permutation p and a bootstrap CI of the ROI's mean and median
                perm = significance.permutation_test_r_diff(truth, fits["cl"][0], fits[other][0], n_permutations, seed)
                boot = significance.bootstrap_r_diff(truth, fits["cl"][0], fits[other][0], n_bootstrap, seed)
                for stat in ("median", "mean"):
                    row[f"perm_p_{stat}_cl_vs_{other}"] = perm[f"p_{stat}"]
                    row[f"{stat}_diff_cl_vs_{other}"] = boot[f"{stat}_diff"]
                    row[f"ci95_{stat}_diff_cl_vs_{other}"] = (f"[{boot[f'{stat}_ci_low']:.3f}, "
                                                              f"{boot[f'{stat}_ci_high']:.3f}]")
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
