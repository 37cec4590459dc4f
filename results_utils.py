"""Result tables: per-ROI accuracy of every feature set, % of voxels improved, the statistics of each comparison
(computed in significance.py over the right unit), group tables and the across-subject tests."""
from __future__ import annotations

import numpy as np

import encoding
import feature_sets as feature_sets_module
import options
import outputs
import significance
import utils
from study import EncodingStudy

SET_LABELS = {"untuned": "untuned", "reg": "reg-tuned", "cl": "CL-tuned", "pooled-reg": "pooled reg",
              "pooled-cl": "pooled CL"}


def percent_improved(r_new, r_base) -> float:
    """% of voxels (finite in both) where r_new > r_base; NaN when none is comparable."""
    r_new, r_base = np.asarray(r_new, dtype=float), np.asarray(r_base, dtype=float)
    both = np.isfinite(r_new) & np.isfinite(r_base)
    return float(100.0 * (r_new[both] > r_base[both]).mean()) if both.any() else float("nan")


def _finite_mean_median(values) -> tuple[float, float, int]:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return float("nan"), float("nan"), int(values.size)
    return float(finite.mean()), float(np.median(finite)), int(values.size - finite.size)


def seed_columns(feature_set: str, per_seed: list) -> dict:
    """A tuned set's spread over its seeds' models: n_seeds, and the mean and SD over seeds of each seed's mean and
    median r (the set's own columns are of the seed-averaged predictions)."""
    out = {f"n_seeds_{feature_set}": len(per_seed)}
    for stat, index in (("mean", 0), ("median", 1)):
        values = [_finite_mean_median(s["r"])[index] for s in per_seed]
        out[f"{stat}_r_{feature_set}_seed_mean"] = float(np.mean(values))
        out[f"{stat}_r_{feature_set}_seed_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return out


def seed_diff_columns(a: str, b: str, seeds_a: list, seeds_b: list) -> dict:
    """Per seed, the difference of the ROI's mean and median r (a's seed k vs b's seed k, or vs b's single model),
    and their mean and SD over seeds: the training-seed spread beside the seed-averaged comparison."""
    pairs = [(sa, sb) for sa, sb in zip(seeds_a, seeds_b)] if len(seeds_a) == len(seeds_b) else \
        [(sa, seeds_b[0]) for sa in seeds_a] if len(seeds_b) == 1 else \
        [(seeds_a[0], sb) for sb in seeds_b] if len(seeds_a) == 1 else []
    out = {}
    for stat, index in (("mean", 0), ("median", 1)):
        diffs = []
        for sa, sb in pairs:
            diff = _finite_mean_median(sa["r"])[index] - _finite_mean_median(sb["r"])[index]
            tag = sa["seed"] if sa["seed"] is not None else sb["seed"]
            out[f"{stat}_diff_{a}_vs_{b}_seed{tag}"] = diff
            diffs.append(diff)
        if len(diffs) > 1:
            out[f"{stat}_diff_{a}_vs_{b}_seed_mean"] = float(np.mean(diffs))
            out[f"{stat}_diff_{a}_vs_{b}_seed_sd"] = float(np.std(diffs, ddof=1))
    return out


def parse_comparisons(comparisons, feature_sets) -> list[tuple[str, str]]:
    """'a:b' strings -> (a, b) pairs of known feature sets (a compared against the baseline b)."""
    pairs = []
    for text in comparisons:
        a, sep, b = str(text).partition(":")
        if not sep or a not in feature_sets or b not in feature_sets:
            raise options.OptionsError(f"comparison {text!r}: expected 'set:baseline' with sets among "
                                     + ", ".join(feature_sets))
        pairs.append((a, b))
    return pairs


def single_subject_rows(study: EncodingStudy, subject: int, hemi: str, rois, feature_sets, comparisons,
                        n_bootstrap: int = 1000, n_permutations: int = 1000, seed: int = 0,
                        retrieval_candidates: int = 300):
    """Per-ROI rows of one subject and hemisphere, per-voxel test r, and {feature set: ROIs without a model}.

    Per set: the layer it was read at, mean and median test r over the ROI's voxels, the challenge score where
    a noise ceiling is known, and (contrastive sets) fMRI -> image retrieval on the test split. Per comparison
    a:b: % voxels improved, the difference of mean and median r with bootstrap CIs and permutation p-values over
    test images. Missing models give empty cells; empty ROIs a row with n_voxels 0.
    """
    rows, voxel_r, missing = [], {}, {}
    d = study.subject(subject)
    ceiling = d.noise_ceiling.get(hemi)
    for roi in rois:
        idx = d.roi_voxel_indices[hemi][roi]
        row = {"subject": subject, "hemisphere": hemi, "roi": roi, "group": utils.roi_group(roi),
               "n_voxels": len(idx), "n_test_images": len(d.split["test"])}
        if not len(idx):
            rows.append({**row, "note": "empty ROI"})
            continue
        fits = {s: study.fit(s, subject, hemi, roi) for s in feature_sets}
        missing.update({s: missing.get(s, []) + [roi] for s, fit in fits.items() if fit is None})
        r = {s: (fit.r if fit is not None else np.full(len(idx), np.nan)) for s, fit in fits.items()}
        voxel_r[roi] = np.stack([r[s] for s in feature_sets]).astype(np.float32)
        for s in feature_sets:
            row[f"layer_{s}"] = "/".join(dict.fromkeys(fits[s].layers)) if fits[s] is not None else ""
        for s in feature_sets:
            row[f"mean_r_{s}"], row[f"median_r_{s}"], row[f"nan_voxels_{s}"] = _finite_mean_median(r[s])
            if ceiling is not None and fits[s] is not None:
                score = encoding.challenge_score(r[s], ceiling[idx])
                row[f"mean_challenge_score_{s}"], row[f"median_challenge_score_{s}"], _ = _finite_mean_median(score)
            if fits[s] is not None and feature_sets_module.is_tuned(s):
                row.update(seed_columns(s, fits[s].per_seed))
        truth = study.test_truth(subject, hemi, roi)
        for a, b in comparisons:
            if fits[a] is None or fits[b] is None:
                continue
            row[f"pct_improved_{a}_vs_{b}"] = percent_improved(r[a], r[b])
            # over test images, not voxels: a permutation p and a bootstrap CI of the ROI's mean and median
            # (tuned sets: of the seed-averaged predictions; the seeds' own differences beside them)
            perm = significance.permutation_test_r_diff(truth, fits[a].prediction, fits[b].prediction,
                                                        n_permutations, seed)
            boot = significance.bootstrap_r_diff(truth, fits[a].prediction, fits[b].prediction, n_bootstrap, seed)
            for stat in ("median", "mean"):
                row[f"{stat}_diff_{a}_vs_{b}"] = boot[f"{stat}_diff"]
                row[f"ci95_{stat}_diff_{a}_vs_{b}"] = f"[{boot[f'{stat}_ci_low']:.3f}, {boot[f'{stat}_ci_high']:.3f}]"
                row[f"perm_p_{stat}_{a}_vs_{b}"] = perm[f"p_{stat}"]
            row.update(seed_diff_columns(a, b, fits[a].per_seed, fits[b].per_seed))
        for s in (s for s in feature_sets if s.endswith("cl") and fits[s] is not None):
            ret = study.retrieval(s, subject, hemi, roi, retrieval_candidates, n_bootstrap, seed)
            n = ret["n_candidates"]
            row[f"top1_of_{n}_{s}"], row[f"top5_of_{n}_{s}"] = ret["top1_subset"], ret["top5_subset"]
            row[f"top1_of_{n}_{s}_ci_low"] = ret["top1_subset_ci_low"]
            row[f"top1_of_{n}_{s}_ci_high"] = ret["top1_subset_ci_high"]
            row[f"top1_of_all_{s}"] = ret["top1_all"]
            row[f"control_top1_of_{n}_{s}"] = ret["control_top1_subset"]
            row[f"chance_top1_of_{n}"] = ret["chance_top1_subset"]
        rows.append(row)
    p_columns = [f"perm_p_{stat}_{a}_vs_{b}" for a, b in comparisons for stat in ("median", "mean")]
    return significance.add_fdr_columns(rows, p_columns), voxel_r, missing


def markdown_report(rows: list[dict], feature_sets, comparisons) -> str:
    """A single-subject table as readable Markdown: accuracy per set, one table per comparison, CL retrieval."""
    present = {k for r in rows for k in r}
    shown = [s for s in feature_sets if any(r.get(f"layer_{s}") for r in rows)]
    accuracy = ["roi", "n_voxels"] + [f"{k}_{s}" for k in ("layer", "mean_r", "median_r",
                                                             "median_challenge_score") for s in shown]
    text = "### Accuracy per feature set (test split)\n\n" + outputs.markdown_table(
        rows, [c for c in accuracy if c in present])
    for a, b in comparisons:
        pair = f"{a}_vs_{b}"
        columns = ["roi", f"pct_improved_{pair}"] + [c for stat in ("mean", "median") for c in (
            f"{stat}_diff_{pair}", f"ci95_{stat}_diff_{pair}", f"perm_p_{stat}_{pair}", f"perm_p_{stat}_{pair}_fdr")]
        if columns[1] in present:
            text += (f"\n### {a} vs {b}: % voxels improved; difference of the ROI's mean and median r with 95% "
                     "bootstrap CI and permutation p over test images (and BH-FDR across ROIs)\n\n"
                     + outputs.markdown_table([r for r in rows if columns[1] in r], columns))
    retrieval = ["roi", "n_test_images"] + sorted(c for c in present if c.startswith(("top1_", "top5_", "control_",
                                                                                        "chance_")))
    if len(retrieval) > 2:
        text += ("\n### fMRI -> image retrieval of the contrastive models (test split; control: fMRI rows "
                 "shuffled)\n\n" + outputs.markdown_table([r for r in rows if r["n_voxels"]], retrieval))
    return text


def long_rows(rows: list[dict], feature_sets) -> list[dict]:
    """Wide single-subject rows -> one row per (subject, hemisphere, ROI, set) with mean and median r."""
    return [{"subject": r["subject"], "hemisphere": r["hemisphere"], "roi": r["roi"], "group": r["group"],
             "method": s, "median_r": r.get(f"median_r_{s}", np.nan), "mean_r": r.get(f"mean_r_{s}", np.nan)}
            for r in rows if r["n_voxels"] for s in feature_sets]


def group_table(rows: list[dict], feature_sets, comparisons) -> list[dict]:
    """The paper's table: per group (Early / Higher / Anatomical / All) the mean over ROIs (and subjects and
    hemispheres) of each set's median and mean test r on the ROIs where every per-subject set (untuned, reg, CL)
    has a score; pooled sets over those of these ROIs where they have a model too (n_rois_<set> says how many).
    Also the mean % of voxels improved per comparison."""
    core = [s for s in feature_sets if s not in ("pooled-reg", "pooled-cl")]
    complete = [r for r in rows if r["n_voxels"]
                and all(np.isfinite(float(r.get(f"median_r_{s}", np.nan))) for s in core)]
    table = []
    for group in list(utils.ROI_GROUPS) + ["All"]:
        members = [r for r in complete if group == "All" or r["group"] == group]
        entry = {"group": group, "n_rois": len({(r["hemisphere"], r["roi"]) for r in members}),
                 "n_subjects": len({r["subject"] for r in members})}
        for s in feature_sets:
            having = [r for r in members if np.isfinite(float(r.get(f"median_r_{s}", np.nan)))]
            if s not in core:
                entry[f"n_rois_{s}"] = len({(r["hemisphere"], r["roi"]) for r in having})
            for stat in ("median", "mean"):
                values = [r[f"{stat}_r_{s}"] for r in having]
                entry[f"{stat}_r_{s}"] = float(np.mean(values)) if values else float("nan")
        for a, b in comparisons:
            values = np.array([r.get(f"pct_improved_{a}_vs_{b}", np.nan) for r in members], dtype=float)
            entry[f"pct_improved_{a}_vs_{b}"] = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
        table.append(entry)
    return table


def across_subject_table(rows: list[dict], feature_sets, comparisons, min_subjects: int = 3) -> list[dict]:
    """Paired t and Wilcoxon tests over subjects (the unit across subjects) of each comparison, per ROI and per
    ROI group (each subject's mean of ROI medians over the group's ROIs where both sets have a score), with
    BH-FDR across the ROIs (and across the groups) of one comparison and hemisphere."""
    long = long_rows(rows, feature_sets)
    out = []
    for a, b in comparisons:
        pair = {}
        for r in long:
            if r["method"] in (a, b):
                pair.setdefault((r["subject"], r["hemisphere"], r["roi"], r["group"]), {})[r["method"]] = r["median_r"]
        groups = {}
        for (subject, hemi, _, group), values in pair.items():
            if all(np.isfinite(float(values.get(m, np.nan))) for m in (a, b)):
                for name in (group, "All"):
                    groups.setdefault((subject, hemi, f"group: {name}"), []).append(values)
        group_long = [{"subject": s, "hemisphere": h, "roi": g, "method": m,
                       "median_r": float(np.mean([v[m] for v in vs]))} for (s, h, g), vs in groups.items() for m in (a, b)]
        for unit_rows in (long, group_long):
            tests = significance.across_subject_tests(unit_rows, "median_r", a, b, min_subjects)
            out += significance.add_fdr_columns(tests, ["p_t", "p_w"], family_keys=("hemisphere",))
    return [t for t in out if t["n_subjects"]]


def off_diagonal_mean(matrix: np.ndarray) -> float:
    """Mean of the finite off-diagonal cells (transfer to other subjects)."""
    off = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")


def cross_subject_matrices(study: EncodingStudy, subjects, hemi: str, roi: str, method: str):
    """Source x target matrices of a per-subject tuned set: median and mean test r over the target's ROI voxels,
    and % of target voxels beating the target's own untuned model."""
    n = len(subjects)
    median_r, mean_r, improved = (np.full((n, n), np.nan) for _ in range(3))
    for j, target in enumerate(subjects):
        base = study.fit("untuned", target, hemi, roi) if len(study.subject(target).roi_voxel_indices[hemi][roi]) \
            else None
        for i, source in enumerate(subjects):
            res = study.fit(method, target, hemi, roi, source=source)
            if res is None:
                continue
            mean_r[i, j], median_r[i, j], _ = _finite_mean_median(res.r)
            if base is not None:
                improved[i, j] = percent_improved(res.r, base.r)
    return median_r, mean_r, improved


def leave_one_subject_out_rows(study: EncodingStudy, subjects, hemi: str, roi: str, feature_sets) -> list[dict]:
    """Per subject and pooled set: the pooled backbone trained WITHOUT the subject, encoded on it, next to the
    pooled backbone trained with it and the subject's untuned and own per-subject models (test split)."""
    rows = []
    for subject in subjects:
        if not len(study.subject(subject).roi_voxel_indices[hemi][roi]):
            continue
        for pooled in (s for s in feature_sets if feature_sets_module.is_pooled(s)):
            loso = study.fit(pooled, subject, hemi, roi, exclude_subject=subject)
            if loso is None:
                continue
            row = {"subject": subject, "hemisphere": hemi, "roi": roi, "feature_set": pooled,
                   "layer_without_subject": "/".join(dict.fromkeys(loso.layers))}
            fits = {"without_subject": loso, "with_subject": study.fit(pooled, subject, hemi, roi),
                    "untuned": study.fit("untuned", subject, hemi, roi),
                    "own": study.fit(feature_sets_module.method_of(pooled), subject, hemi, roi)}
            for name, fit in fits.items():
                if fit is not None:
                    row[f"mean_r_{name}"], row[f"median_r_{name}"], _ = _finite_mean_median(fit.r)
            if fits["untuned"] is not None:
                row["pct_improved_without_subject_vs_untuned"] = percent_improved(loso.r, fits["untuned"].r)
            rows.append(row)
    return rows
