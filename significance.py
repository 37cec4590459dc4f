"""Significance tests and confidence intervals over the right unit: test images within a subject, subjects across
subjects; FDR across ROIs. Also fMRI -> image retrieval accuracy of CL embeddings with its CI and shuffled control.

Within a subject the unit is the test image (never the voxel: neighbouring voxels share noise, so voxel
counts overstate the evidence). Both resampling schemes are vectorised over resamples: a resample is a
weight (or swap) vector over test images, so its per-voxel sums for all resamples are one float64 matmul
per voxel chunk. Every draw comes from a numpy Generator seeded by `seed`. docs/statistics.md gives the reasons.
"""
from __future__ import annotations

import warnings

import numpy as np

import encoding

# -- Within a subject: bootstrap and permutation over test images --


def _check_predictions(y_true, *preds):
    arrays = [np.asarray(m) for m in (y_true, *preds)]
    if len({m.shape for m in arrays}) != 1 or arrays[0].ndim != 2 or arrays[0].shape[0] < 3:
        raise ValueError(f"y_true and predictions of shapes {', '.join(str(m.shape) for m in arrays)}: expected "
                         "equal 2-D test images x voxels shapes with >= 3 test images")
    return arrays


def _r_from_sums(n, s_y, s_p, s_yy, s_pp, s_yp):
    """Pearson r from (weighted) sums over n images; NaN where either side has (numerically) no variance."""
    var_y, var_p = n * s_yy - s_y * s_y, n * s_pp - s_p * s_p
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (n * s_yp - s_y * s_p) / np.sqrt(var_y * var_p)
    # a column made of one repeated value is constant: its variance is rounding noise, not exactly 0
    r[(var_y <= 1e-12 * np.abs(n * s_yy)) | (var_p <= 1e-12 * np.abs(n * s_pp))] = np.nan
    return np.clip(r, -1, 1)


def _mean_median_diffs(r_a, r_b):
    """Per row (resample): nanmean and nanmedian over voxels of r_a minus those of r_b."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row gives a NaN difference
        return (np.nanmean(r_a, axis=1) - np.nanmean(r_b, axis=1),
                np.nanmedian(r_a, axis=1) - np.nanmedian(r_b, axis=1))


def _voxel_chunks(v, voxel_chunk, progress, desc):
    starts = range(0, v, voxel_chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit="chunk")
    return (slice(s, s + voxel_chunk) for s in starts)


def bootstrap_rows(n_test: int, n_boot: int, seed: int) -> np.ndarray:
    """The bootstrap's draws: n_boot x n_test row indices drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n_test, size=(n_boot, n_test))


def _bootstrap_r(y, preds, n_boot: int, seed: int, voxel_chunk: int, progress: bool) -> list[np.ndarray]:
    """Per prediction matrix: every voxel's r on each of the n_boot resamples of bootstrap_rows (float32)."""
    n, v = y.shape
    rows = bootstrap_rows(n, n_boot, seed)
    counts = np.bincount((rows + n * np.arange(n_boot)[:, None]).ravel(),
                         minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    r_out = [np.empty((n_boot, v), dtype=np.float32) for _ in preds]
    for cols in _voxel_chunks(v, voxel_chunk, progress, "bootstrap voxel chunks"):
        blocks = [np.asarray(m[:, cols], np.float64) for m in (y, *preds)]
        centred = [blk - blk.mean(0) for blk in blocks]   # centring keeps sums of squares accurate
        constant = [blk.max(0) == blk.min(0) for blk in blocks]
        yc, pcs, vc = centred[0], centred[1:], blocks[0].shape[1]
        sums = counts @ np.concatenate([yc, yc * yc] + [q for p in pcs for q in (p, p * p, yc * p)], axis=1)
        s_y, s_yy, *per_pred = (sums[:, i * vc:(i + 1) * vc] for i in range(2 + 3 * len(pcs)))
        for k, out in enumerate(r_out):
            s_p, s_pp, s_yp = per_pred[3 * k:3 * k + 3]
            r = _r_from_sums(n, s_y, s_p, s_yy, s_pp, s_yp)
            r[:, constant[0] | constant[1 + k]] = np.nan
            out[:, cols] = r
    return r_out


def _percentile_ci(values, ci: float) -> tuple[float, float]:
    tail = 100 * (1 - ci) / 2
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_r_diff(y_true, pred_a, pred_b, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                     voxel_chunk: int = 1024, progress: bool = False) -> dict:
    """Bootstrap over test images of the ROI's mean and median r (over voxels) of method a minus method b.

    Each resample draws test images with replacement and recomputes every voxel's r for both methods on it.
    Returns mean_diff, median_diff (observed), percentile CIs {mean,median}_ci_low/high, the resampled
    differences {mean,median}_boot_diffs (n_boot each), n_boot, seed, ci.
    """
    y, a, b = _check_predictions(y_true, pred_a, pred_b)
    r_obs = [encoding.pearson_r(y, p) for p in (a, b)]
    (mean_obs,), (median_obs,) = _mean_median_diffs(r_obs[0][None], r_obs[1][None])
    r_a, r_b = _bootstrap_r(y, (a, b), n_boot, seed, voxel_chunk, progress)
    mean_diffs, median_diffs = _mean_median_diffs(r_a, r_b)
    out = {"mean_diff": float(mean_obs), "median_diff": float(median_obs)}
    for name, diffs in (("mean", mean_diffs), ("median", median_diffs)):
        low, high = _percentile_ci(diffs, ci)
        out.update({f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_boot_diffs": diffs})
    return {**out, "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci)}


def bootstrap_r_ci(y_true, pred, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                   voxel_chunk: int = 1024, progress: bool = False) -> dict:
    """Bootstrap over test images of one set's ROI mean and median r over voxels (the error bars of its bars).

    The same resamples as bootstrap_r_diff for the same seed and test-image count. Returns mean_r, median_r
    (observed), percentile CIs {mean,median}_ci_low/high, the resampled {mean,median}_boot (n_boot each),
    n_boot, seed, ci.
    """
    y, p = _check_predictions(y_true, pred)
    r_obs = encoding.pearson_r(y, p)
    (r_boot,) = _bootstrap_r(y, (p,), n_boot, seed, voxel_chunk, progress)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row (every voxel constant) gives NaN
        for name, stat in (("mean", np.nanmean), ("median", np.nanmedian)):
            values = stat(r_boot, axis=1)
            low, high = _percentile_ci(values, ci)
            out.update({f"{name}_r": float(stat(r_obs)), f"{name}_ci_low": low, f"{name}_ci_high": high,
                        f"{name}_boot": values})
    return {**out, "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci)}


def swap_masks(n_test: int, n_permutations: int, seed: int, exact: bool) -> np.ndarray:
    """Which test images swap the two methods' predictions: all 2^n_test masks (exact), else n_permutations
    seeded fair coin flips per image."""
    if exact:
        if n_test > 24:
            raise ValueError(f"exact permutation test over {n_test} test images: 2^{n_test} swaps are too many")
        return ((np.arange(2 ** n_test)[:, None] >> np.arange(n_test)) & 1).astype(bool)
    return np.random.default_rng(seed).random((n_permutations, n_test)) < 0.5


def _standardise(block: np.ndarray) -> np.ndarray:
    """Each column z-scored over the rows (test images); a constant column becomes zeros (its r stays NaN)."""
    centred = block - block.mean(0)
    sd = np.sqrt((centred * centred).mean(0))
    constant = (block.max(0) == block.min(0)) | (sd == 0)
    return np.where(constant, 0.0, centred / np.where(constant, 1.0, sd))


def permutation_test_r_diff(y_true, pred_a, pred_b, n_permutations: int = 1000, seed: int = 0,
                            exact: bool | None = None, voxel_chunk: int = 1024, progress: bool = False) -> dict:
    """Paired permutation test over test images (swap a's and b's predictions of random images: under H0 nothing
    changes) of the difference in the ROI's mean and median r over voxels; two-sided p-values.

    Each voxel's predictions are z-scored per set over the test images before any swap (r is unchanged): swapping
    rows of differently scaled predictions would inflate the null and cost the test its power.
    exact (None: when 2^n_test <= n_permutations): all 2^n_test swap masks, p = #(|null| >= |observed|) / 2^n;
    else p = (1 + #) / (1 + n_permutations) over seeded random masks. Returns mean_diff, median_diff, p_mean,
    p_median, n_permutations, exact, seed, null_{mean,median}_diffs (one per mask; NaN counts as extreme).
    """
    y, a, b = _check_predictions(y_true, pred_a, pred_b)
    n, v = y.shape
    exact = bool(2 ** min(n, 63) <= n_permutations) if exact is None else exact
    masks = swap_masks(n, n_permutations, seed, exact)
    if not exact:  # row 0: no swap, the observed statistic through the same arithmetic
        masks = np.concatenate([np.zeros((1, n), dtype=bool), masks])
    weights = masks.astype(np.float64)
    r_a = np.empty((len(masks), v), dtype=np.float64)
    r_b = np.empty((len(masks), v), dtype=np.float64)
    for cols in _voxel_chunks(v, voxel_chunk, progress, "permutation voxel chunks"):
        yb = np.asarray(y[:, cols], np.float64)
        ac, bc = (_standardise(np.asarray(m[:, cols], np.float64)) for m in (a, b))
        yc = yb - yb.mean(0)
        d = bc - ac
        vc = yc.shape[1]
        # swapping image i changes a's sums by d_i, b_i^2 - a_i^2, y_i d_i and b's by minus those
        deltas = weights @ np.concatenate([d, bc * bc - ac * ac, yc * d], axis=1)
        g_d, g_q, g_yd = (deltas[:, i * vc:(i + 1) * vc] for i in range(3))
        s_y, s_yy = yc.sum(0), (yc * yc).sum(0)
        constant_y = yb.max(0) == yb.min(0)
        for out, p, sign in ((r_a, ac, 1.0), (r_b, bc, -1.0)):
            r = _r_from_sums(n, s_y, p.sum(0) + sign * g_d, s_yy, (p * p).sum(0) + sign * g_q,
                             (yc * p).sum(0) + sign * g_yd)
            r[:, constant_y] = np.nan
            out[:, cols] = r
    mean_diffs, median_diffs = _mean_median_diffs(r_a, r_b)
    out = {"mean_diff": float(mean_diffs[0]), "median_diff": float(median_diffs[0])}
    for name, diffs in (("mean", mean_diffs), ("median", median_diffs)):
        observed = abs(diffs[0])
        null = diffs if exact else diffs[1:]
        # tolerance: a mask and its complement give +-T through different float64 rounding (~1e-15)
        extreme = int((~(np.abs(null) < observed * (1 - 1e-9) - 1e-12)).sum())
        out[f"p_{name}"] = extreme / len(null) if exact else (1 + extreme) / (1 + len(null))
        out[f"null_{name}_diffs"] = null
        if not np.isfinite(observed):
            out[f"p_{name}"] = float("nan")
    return {**out, "n_permutations": int(len(masks) - (0 if exact else 1)), "exact": exact, "seed": int(seed)}


# -- Across subjects: paired tests of per-subject ROI scores --


def across_subject_tests(rows, metric: str, method_a: str, method_b: str, min_subjects: int = 3,
                         keys=("hemisphere", "roi")) -> list[dict]:
    """Paired t-test (scipy ttest_rel) and Wilcoxon signed-rank test (scipy wilcoxon) over subjects, per ROI.

    rows: long rows with 'subject', 'method', the `keys` and `metric` (e.g. each subject's median_r of an ROI).
    One result per key: n_subjects (finite for both methods), mean_diff (a - b), t, p_t, W, p_w (two-sided);
    the tests run when n_subjects >= min_subjects (else NaN), W/p_w also NaN when every difference is 0.
    """
    from scipy.stats import ttest_rel, wilcoxon
    values: dict = {}
    for row in rows:
        if row.get("method") not in (method_a, method_b):
            continue
        by_subject = values.setdefault(tuple(row.get(k) for k in keys), {}).setdefault(row["subject"], {})
        if row["method"] in by_subject:
            raise ValueError(f"two {row['method']!r} rows for subject {row['subject']} at "
                             f"{dict(zip(keys, (row.get(k) for k in keys)))}; expected one per subject")
        by_subject[row["method"]] = _as_float(row.get(metric))
    out = []
    for key, by_subject in values.items():
        pairs = np.array([(m[method_a], m[method_b]) for _, m in sorted(by_subject.items())
                          if np.isfinite(m.get(method_a, np.nan)) and np.isfinite(m.get(method_b, np.nan))])
        n = len(pairs)
        res = {**dict(zip(keys, key)), "metric": metric, "method_a": method_a, "method_b": method_b,
               "n_subjects": n, "mean_diff": float(np.mean(pairs[:, 0] - pairs[:, 1])) if n else float("nan"),
               "t": float("nan"), "p_t": float("nan"), "W": float("nan"), "p_w": float("nan")}
        if n >= min_subjects:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # identical differences: t is NaN or inf
                t = ttest_rel(pairs[:, 0], pairs[:, 1])
            res["t"], res["p_t"] = float(t.statistic), float(t.pvalue)
            if np.any(pairs[:, 0] != pairs[:, 1]):
                w = wilcoxon(pairs[:, 0], pairs[:, 1])
                res["W"], res["p_w"] = float(w.statistic), float(w.pvalue)
        out.append(res)
    return out


# -- Multiple comparisons: Benjamini-Hochberg across ROIs --


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # None, '' or a note in a table cell
        return float("nan")


def fdr_bh(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy false_discovery_control); NaNs stay NaN and don't count."""
    from scipy.stats import false_discovery_control
    p = np.array([_as_float(x) for x in np.ravel(pvalues)])
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = false_discovery_control(p[finite], method="bh")
    return out.reshape(np.shape(pvalues))


def add_fdr_columns(rows, p_columns, family_keys=()) -> list[dict]:
    """Copies of rows with '<p>_fdr' for each p column: BH over the rows sharing the family_keys values.

    A family is one p column (one comparison) across ROIs, split by family_keys (e.g. ('subject',
    'hemisphere')); rows without the column get no '<p>_fdr'.
    """
    out = [dict(row) for row in rows]
    for column in p_columns:
        families: dict = {}
        for i, row in enumerate(out):
            if column in row:
                families.setdefault(tuple(row.get(k) for k in family_keys), []).append(i)
        for members in families.values():
            for i, q in zip(members, fdr_bh([out[i][column] for i in members])):
                out[i][f"{column}_fdr"] = float(q)
    return out


# -- fMRI -> image retrieval of CL embeddings --


def candidate_subsets(n_test: int, n_candidates: int = 300, n_subsets: int = 100, seed: int = 0) -> np.ndarray:
    """Seeded random candidate sets, n_subsets x n_candidates image indices; one set of all images when
    n_test <= n_candidates."""
    if n_test <= n_candidates:
        return np.arange(n_test)[None]
    order = np.random.default_rng(seed).permuted(np.tile(np.arange(n_test), (n_subsets, 1)), axis=1)
    return order[:, :n_candidates]


def retrieval_hits(fmri_emb, image_emb, subsets, top_k=(1, 5)):
    """Per query (fMRI row i, its image row i): times it was a candidate query, and per k the times its own
    image ranked in the top k of its subset by cosine similarity (ties count against it)."""
    f, g = (np.asarray(e, dtype=np.float64) for e in (fmri_emb, image_emb))
    if f.shape != g.shape or f.ndim != 2:
        raise ValueError(f"fMRI embeddings {f.shape} and image embeddings {g.shape}: expected equal n x z shapes")
    norms = [np.linalg.norm(e, axis=1, keepdims=True) for e in (f, g)]
    if not all(np.isfinite(e).all() and (nm > 0).all() for e, nm in zip((f, g), norms)):
        raise ValueError("embeddings must be finite with non-zero rows (cosine similarity is undefined otherwise)")
    similarity = (f / norms[0]) @ (g / norms[1]).T      # queries x images
    appearances = np.zeros(len(f))
    hits = np.zeros((len(top_k), len(f)))
    for idx in subsets:  # a loop over candidate sets (~100), each vectorised over its queries
        block = similarity[np.ix_(idx, idx)]
        rank = (block >= np.diag(block)[:, None]).sum(1) - 1   # other candidates at least as similar
        appearances[idx] += 1
        hits[:, idx] += rank[None, :] < np.asarray(top_k)[:, None]
    return appearances, hits


def retrieval_accuracy(fmri_emb, image_emb, top_k=(1, 5), n_candidates: int = 300, n_subsets: int = 100,
                       n_boot: int = 1000, ci: float = 0.95, seed: int = 0, control: bool = True) -> dict:
    """fMRI -> image retrieval top-k accuracy among n_candidates (MindEye: chance 1/300) and among all test images.

    Among n_candidates: the average over n_subsets seeded random subsets, each query against its subset
    (all images when fewer). Percentile CIs resample the queries (test images) with replacement.
    control: the same with the fMRI rows shuffled (seeded), which must sit at chance (k / pool size).
    Keys: top{k}_{pool}, top{k}_{pool}_ci_low/high, chance_top{k}_{pool}, control_top{k}_{pool} with pool
    'subset' (n_candidates images; n_candidates says how many were used) or 'all'; n_test, n_subsets, n_boot,
    seed, ci.
    """
    f = np.asarray(fmri_emb)
    n = len(f)
    pools = {"subset": candidate_subsets(n, n_candidates, n_subsets, seed), "all": np.arange(n)[None]}
    rows = np.random.default_rng([seed, 1]).integers(0, n, size=(n_boot, n))
    counts = np.bincount((rows + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n).reshape(n_boot, n)
    shuffled = f[np.random.default_rng([seed, 2]).permutation(n)]
    out = {"n_test": n, "n_candidates": pools["subset"].shape[1], "n_subsets": len(pools["subset"]),
           "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci)}
    tail = 100 * (1 - ci) / 2
    for pool, subsets in pools.items():
        appearances, hits = retrieval_hits(f, image_emb, subsets, top_k)
        with np.errstate(invalid="ignore", divide="ignore"):   # ratio estimator, n_boot x len(top_k)
            boot = (counts @ hits.T) / (counts @ appearances)[:, None]
        lows, highs = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
        if control:
            control_appearances, control_hits = retrieval_hits(shuffled, image_emb, subsets, top_k)
        for j, k in enumerate(top_k):
            key = f"top{k}_{pool}"
            out[key] = float(hits[j].sum() / appearances.sum())
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(lows[j]), float(highs[j])
            out[f"chance_{key}"] = min(k, subsets.shape[1]) / subsets.shape[1]
            if control:
                out[f"control_{key}"] = float(control_hits[j].sum() / control_appearances.sum())
    return out
