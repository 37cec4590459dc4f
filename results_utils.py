"""Result tables: per-ROI accuracy of every feature set, % of voxels improved, the statistics of each comparison
(computed in significance.py over the right unit), group tables and the across-subject tests."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

import encoding
import feature_sets as feature_sets_module
import options
import outputs
import significance
import utils
from study import EncodingStudy

STATISTICS = ("mean", "median")


def percent_improved(r_new, r_base) -> float:
    """% of voxels (finite in both) where r_new > r_base; NaN when none is comparable."""
    r_new, r_base = np.asarray(r_new, dtype=float), np.asarray(r_base, dtype=float)
    both = np.isfinite(r_new) & np.isfinite(r_base)
    return float(100.0 * (r_new[both] > r_base[both]).mean()) if both.any() else float("nan")


def _float(value) -> float:
    """A table cell as a float: NaN for None, '' or a note (rows read back from CSV hold strings)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


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
    """'a:b' strings -> (a, b) pairs of known feature sets (a compared against the baseline b; a set may hold a
    colon itself: 'external:clip:untuned')."""
    pairs = []
    for text in map(str, comparisons):
        cuts = [(text[:i], text[i + 1:]) for i, c in enumerate(text) if c == ":"]
        a, b = next(((a, b) for a, b in cuts if a in feature_sets and b in feature_sets), ("", ""))
        if not a:
            raise options.OptionsError(f"comparison {text!r}: expected 'set:baseline' with sets among "
                                     + ", ".join(feature_sets))
        pairs.append((a, b))
    return pairs


@dataclass
class HemisphereResults:
    """One subject and hemisphere: the per-ROI rows and what the figures and maps need from the fits."""
    rows: list
    voxel_r: dict = field(default_factory=dict)   # ROI -> sets x voxels test r (float32; NaN: no model)
    missing: dict = field(default_factory=dict)   # set -> ROIs without a model
    layers: dict = field(default_factory=dict)    # set -> {ROI: the layer most of its models (seeds) were read at}
    alphas: dict = field(default_factory=dict)    # set -> [per-voxel ridge alphas of each model (ROI, seed)]


def single_subject_rows(study: EncodingStudy, subject: int, hemi: str, rois, feature_sets, comparisons,
                        n_bootstrap: int = 1000, n_permutations: int = 1000, seed: int = 0,
                        retrieval_candidates: int = 300) -> HemisphereResults:
    """Per-ROI rows of one subject and hemisphere, with per-voxel test r, layers, alphas and missing models.

    Per set: the layer it was read at, mean and median test r over the ROI's voxels with bootstrap CIs over test
    images ({mean,median}_r_<set>_ci_low/_ci_high), the challenge score where a noise ceiling is known, and
    (contrastive sets) fMRI -> image retrieval on the test split. Per comparison a:b: % voxels improved, the
    difference of mean and median r with bootstrap CIs ({stat}_diff_a_vs_b_ci_low/_ci_high) and permutation
    p-values over test images. Missing models give empty cells; empty ROIs a row with n_voxels 0.
    """
    out = HemisphereResults([])
    rows, voxel_r, missing = out.rows, out.voxel_r, out.missing
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
        for s, fit in ((s, fit) for s, fit in fits.items() if fit is not None):
            out.layers.setdefault(s, {})[roi] = Counter(fit.layers).most_common(1)[0][0]
            out.alphas.setdefault(s, []).extend(np.asarray(m["alphas"], dtype=np.float32) for m in fit.per_seed)
        for s in feature_sets:
            row[f"layer_{s}"] = "/".join(dict.fromkeys(fits[s].layers)) if fits[s] is not None else ""
        truth = study.test_truth(subject, hemi, roi)
        for s in feature_sets:
            row[f"mean_r_{s}"], row[f"median_r_{s}"], row[f"nan_voxels_{s}"] = _finite_mean_median(r[s])
            boot = significance.bootstrap_r_ci(truth, fits[s].prediction, n_bootstrap, seed) \
                if fits[s] is not None else {}
            for stat in STATISTICS:
                for end in ("ci_low", "ci_high"):
                    row[f"{stat}_r_{s}_{end}"] = float(boot.get(f"{stat}_{end}", np.nan))
            if ceiling is not None and fits[s] is not None:
                score = encoding.challenge_score(r[s], ceiling[idx])
                row[f"mean_challenge_score_{s}"], row[f"median_challenge_score_{s}"], _ = _finite_mean_median(score)
            if fits[s] is not None and feature_sets_module.is_tuned(s):
                row.update(seed_columns(s, fits[s].per_seed))
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
                row[f"{stat}_diff_{a}_vs_{b}_ci_low"] = boot[f"{stat}_ci_low"]
                row[f"{stat}_diff_{a}_vs_{b}_ci_high"] = boot[f"{stat}_ci_high"]
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
    out.rows = significance.add_fdr_columns(rows, p_columns)
    return out


def _ci_text(low, high) -> str:
    low, high = _float(low), _float(high)
    return f"[{low:.3f}, {high:.3f}]" if np.isfinite(low) and np.isfinite(high) else "–"


def _table_with_cis(rows: list[dict], columns, with_ci=None) -> str:
    """Markdown table of the present columns; each of with_ci (default: every column with c_ci_low/c_ci_high in
    the rows) followed by its CI as '[lo, hi]'."""
    present = {k for r in rows for k in r}
    shown = [c for c in columns if c in present]
    annotated = [c for c in (shown if with_ci is None else with_ci) if c in shown and f"{c}_ci_low" in present]
    for c in annotated:
        shown.insert(shown.index(c) + 1, f"{c} 95% CI")
    display = [{**r, **{f"{c} 95% CI": _ci_text(r.get(f"{c}_ci_low"), r.get(f"{c}_ci_high")) for c in annotated}}
               for r in rows]
    return outputs.markdown_table(display, shown)


def markdown_report(rows: list[dict], feature_sets, comparisons) -> str:
    """A single-subject table as readable Markdown: accuracy per set, one table per comparison, CL retrieval;
    CIs shown as '[lo, hi]' after their statistic."""
    present = {k for r in rows for k in r}
    shown = [s for s in feature_sets if any(r.get(f"layer_{s}") for r in rows)]
    accuracy = ["roi", "n_voxels"] + [f"{k}_{s}" for k in ("layer", "mean_r", "median_r",
                                                             "median_challenge_score") for s in shown]
    text = ("### Accuracy per feature set (test split; 95% bootstrap CI of the median over test images)\n\n"
            + _table_with_cis(rows, accuracy, [f"median_r_{s}" for s in shown]))
    seeded = [s for s in shown if any(_float(r.get(f"n_seeds_{s}", 0)) > 1 for r in rows)]
    if seeded:
        columns = ["roi"] + [c for s in seeded for c in (f"n_seeds_{s}", f"median_r_{s}_seed_mean",
                                                         f"median_r_{s}_seed_sd")]
        text += ("\n### Training seeds: median r of each seed's model, mean and SD over seeds (the tables above and "
                 "below use the seed-averaged predictions)\n\n"
                 + _table_with_cis([r for r in rows if any(_float(r.get(f"n_seeds_{s}", 0)) > 1 for s in seeded)],
                                   columns))
    for a, b in comparisons:
        pair = f"{a}_vs_{b}"
        columns = ["roi", f"pct_improved_{pair}"] + [c for stat in STATISTICS for c in (
            f"{stat}_diff_{pair}", f"{stat}_diff_{pair}_seed_sd", f"perm_p_{stat}_{pair}",
            f"perm_p_{stat}_{pair}_fdr") if c in present]
        if columns[1] in present:
            text += (f"\n### {a} vs {b}: % voxels improved; difference of the ROI's mean and median r with 95% "
                     "bootstrap CI and permutation p over test images (and BH-FDR across ROIs); seed_sd: SD of the "
                     "difference over training seeds\n\n"
                     + _table_with_cis([r for r in rows if columns[1] in r], columns))
    retrieval = ["roi", "n_test_images"] + sorted(c for c in present if c.startswith(("top1_", "top5_", "control_",
                                                                                        "chance_"))
                                                  and not c.endswith(("_ci_low", "_ci_high")))
    if len(retrieval) > 2:
        text += ("\n### fMRI -> image retrieval of the contrastive models (test split; control: fMRI rows "
                 "shuffled)\n\n" + _table_with_cis([r for r in rows if r["n_voxels"]], retrieval))
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
                       "median_r": float(np.mean([v[m] for v in vs]))}
                      for (s, h, g), vs in groups.items() for m in (a, b)]
        for unit_rows in (long, group_long):
            tests = significance.across_subject_tests(unit_rows, "median_r", a, b, min_subjects)
            out += significance.add_fdr_columns(tests, ["p_t", "p_w"], family_keys=("hemisphere",))
    return [t for t in out if t["n_subjects"]]


def off_diagonal_mean(matrix: np.ndarray) -> float:
    """Mean of the finite off-diagonal cells (transfer to other subjects)."""
    off = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")


def cross_subject_column(study: EncodingStudy, target: int, sources, hemi: str, roi: str, method: str) -> dict:
    """One target subject's column of the source x target matrices of a per-subject tuned set: {'median_r',
    'mean_r': test r over the target's ROI voxels with each source's backbone, 'pct_improved': % of the target's
    voxels beating its own untuned model} (NaN where a source has no model)."""
    column = {name: np.full(len(sources), np.nan) for name in ("median_r", "mean_r", "pct_improved")}
    if not len(study.subject(target).roi_voxel_indices[hemi][roi]):
        return column
    base = study.fit("untuned", target, hemi, roi)
    for i, source in enumerate(sources):
        res = study.fit(method, target, hemi, roi, source=source)
        if res is not None:
            column["mean_r"][i], column["median_r"][i], _ = _finite_mean_median(res.r)
            column["pct_improved"][i] = percent_improved(res.r, base.r) if base is not None else np.nan
    return column


def cross_subject_matrices(study: EncodingStudy, subjects, hemi: str, roi: str, method: str):
    """Source x target matrices (median r, mean r, % improved) of a per-subject tuned set (cross_subject_column)."""
    columns = [cross_subject_column(study, target, subjects, hemi, roi, method) for target in subjects]
    return tuple(np.stack([c[name] for c in columns], axis=1) for name in ("median_r", "mean_r", "pct_improved"))


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


# ---- Tidy tables: one row per (subject, hemisphere, ROI, set or comparison, statistic) ----

TIDY_COLUMNS = ("subject", "hemisphere", "roi", "roi_family", "group", "n_voxels", "kind", "feature_set", "baseline",
                "comparison", "statistic", "value", "ci_low", "ci_high", "p", "p_fdr", "layer")


def _tidy(row: dict, kind: str, statistic: str, value, *, feature_set="", baseline="", ci=(np.nan, np.nan),
          p=np.nan, p_fdr=np.nan, layer="") -> dict:
    return {"subject": int(row["subject"]), "hemisphere": row["hemisphere"], "roi": row["roi"],
            "roi_family": utils.ROI_FAMILY_OF.get(row["roi"], ""), "group": utils.roi_group(row["roi"]),
            "n_voxels": int(_float(row.get("n_voxels", 0))), "kind": kind, "feature_set": feature_set,
            "baseline": baseline, "comparison": f"{feature_set}:{baseline}" if baseline else "",
            "statistic": statistic, "value": _float(value), "ci_low": _float(ci[0]), "ci_high": _float(ci[1]),
            "p": _float(p), "p_fdr": _float(p_fdr), "layer": layer}


def tidy_rows(rows: list[dict], feature_sets, comparisons) -> list[dict]:
    """Wide single-subject rows -> tidy rows (TIDY_COLUMNS): kind 'set' (mean_r, median_r, challenge scores),
    'comparison' (pct_improved, mean_diff, median_diff with CI, permutation p and BH-FDR p) and 'retrieval'
    (top1_of_<n>, top5_of_<n>, top1_of_all, control_top1_of_<n>, chance_top1_of_<n>). Only what was measured:
    empty ROIs and sets without a model give no rows. Numbers are floats, CIs numeric."""
    out = []
    for row in (r for r in rows if _float(r.get("n_voxels", 0)) > 0):
        for s in (s for s in feature_sets if row.get(f"layer_{s}") not in (None, "")):
            layer = row[f"layer_{s}"]
            for stat in ("mean_r", "median_r"):
                out.append(_tidy(row, "set", stat, row.get(f"{stat}_{s}"), feature_set=s, layer=layer,
                                 ci=(row.get(f"{stat}_{s}_ci_low"), row.get(f"{stat}_{s}_ci_high"))))
            for stat in ("mean_challenge_score", "median_challenge_score"):
                if f"{stat}_{s}" in row:
                    out.append(_tidy(row, "set", stat, row[f"{stat}_{s}"], feature_set=s, layer=layer))
        for a, b in comparisons:
            pair = f"{a}_vs_{b}"
            if f"pct_improved_{pair}" not in row:
                continue
            out.append(_tidy(row, "comparison", "pct_improved", row[f"pct_improved_{pair}"], feature_set=a,
                             baseline=b))
            for stat in STATISTICS:
                column = f"{stat}_diff_{pair}"
                out.append(_tidy(row, "comparison", f"{stat}_diff", row.get(column), feature_set=a, baseline=b,
                                 ci=(row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")),
                                 p=row.get(f"perm_p_{stat}_{pair}"), p_fdr=row.get(f"perm_p_{stat}_{pair}_fdr")))
        for s in feature_sets:
            for key in [k for k in row if k.endswith(f"_{s}") and k.startswith(("top1_of_", "top5_of_",
                                                                                  "control_top1_of_"))]:
                statistic = key[:-len(s) - 1]
                out.append(_tidy(row, "retrieval", statistic, row[key], feature_set=s,
                                 ci=(row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high"))))
                if statistic.startswith("top1_of_") and statistic != "top1_of_all":
                    out.append(_tidy(row, "retrieval", f"chance_{statistic}", row.get(f"chance_{statistic}"),
                                     feature_set=s))
    return out


def tidy_matrix_rows(matrices: dict, subjects, **keys) -> list[dict]:
    """Cross-subject matrices {statistic: source x target array} -> rows of keys (e.g. method, hemisphere, roi),
    source, target, same_subject, statistic, value; NaN cells (no model) are left out."""
    out = []
    for statistic, matrix in matrices.items():
        for i, source in enumerate(subjects):
            for j, target in enumerate(subjects):
                if np.isfinite(matrix[i, j]):
                    out.append({**keys, "roi_family": utils.ROI_FAMILY_OF.get(keys.get("roi"), ""),
                                "source": int(source), "target": int(target), "same_subject": source == target,
                                "statistic": statistic, "value": float(matrix[i, j])})
    return out


LOSO_BACKBONES = ("without_subject", "with_subject", "own", "untuned")


def tidy_loso_rows(rows: list[dict]) -> list[dict]:
    """leave_one_subject_out_rows -> one row per (subject, hemisphere, ROI, pooled set, backbone, statistic):
    backbone without_subject | with_subject | own | untuned; statistic mean_r | median_r | pct_improved_vs_untuned."""
    out = []
    for row in rows:
        keys = {"subject": int(row["subject"]), "hemisphere": row["hemisphere"], "roi": row["roi"],
                "roi_family": utils.ROI_FAMILY_OF.get(row["roi"], ""), "group": utils.roi_group(row["roi"]),
                "feature_set": row["feature_set"]}
        for backbone in LOSO_BACKBONES:
            layer = row.get("layer_without_subject", "") if backbone == "without_subject" else ""
            for stat in ("mean_r", "median_r"):
                if f"{stat}_{backbone}" in row:
                    out.append({**keys, "backbone": backbone, "statistic": stat,
                                "value": _float(row[f"{stat}_{backbone}"]), "layer": layer})
        if "pct_improved_without_subject_vs_untuned" in row:
            out.append({**keys, "backbone": "without_subject", "statistic": "pct_improved_vs_untuned",
                        "value": _float(row["pct_improved_without_subject_vs_untuned"]),
                        "layer": row.get("layer_without_subject", "")})
    return out
