"""Encoding core: Pearson r, ridge with one alpha per voxel, feature scaling, the Algonauts challenge score.

Depends on nothing else in this repo (numpy, torch, scikit-learn only). Conventions:
- arrays are images x voxels (rows = stimuli, columns = voxels/vertices), features images x features;
- a per-voxel score that cannot be computed (constant column, empty set) is NaN, never a silent 0;
- ridge: decompositions in torch float64 (GPU when present); the voxel loop's matmuls in float32 (numpy on CPU);
- bad arrays raise ValueError (the scripts validate user data before it reaches this module).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Fixed alphas of the paper's seed-compatible mode.
PAPER_ALPHA_UNTUNED = 1e3   # untuned (ImageNet) features reduced to PCA(1000)
PAPER_ALPHA_TUNED = 1e4     # fine-tuned model, classifier.6 features
# The one alpha grid (scripts' `alphas = []`). alpha competes with the eigenvalues of X^T X, ~7.4e3 on average for
# unit-scaled features and ~7,400 train images: 1e1 (nearly OLS) .. 1e7 (all shrunk: voxels without signal)
# brackets the paper's fixed 1e3 and 1e4; RidgeFit.alpha_summary() says how many voxels sit at an edge.
ALPHAS = tuple(10.0 ** k for k in range(1, 8))


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def pearson_r(y_true, y_pred, block_rows: int = 32):
    """Pearson r of each column (voxel) of y_true vs y_pred (numpy arrays; float64 out, NaN if constant).

    1-D inputs give a scalar; fewer than 2 rows give NaN. Measured fastest (20,000 voxels x 1,500
    float32 images: ~4x a z-score version, ~12x scipy.stats.pearsonr(axis=0)): one pass over the rows
    in cache-sized blocks, column ranges in parallel threads. Columns are shifted by their mean over
    the first block (so sums of squares barely cancel); float32 products are summed in float32 within
    a block of block_rows rows and in float64 across blocks (|error| < ~5e-7 on r, the resolution of
    float32 data), other dtypes in float64. The rare column whose first block is far from its mean,
    and any constant column, is redone by the two-pass float64 formula.
    """
    a, b = np.asarray(y_true), np.asarray(y_pred)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"pearson_r: y_true {a.shape} and y_pred {b.shape} must be the same 1-D or 2-D shape")
    scalar = a.ndim == 1
    if scalar:
        a, b = a[:, None], b[:, None]
    n_rows, n_cols = a.shape
    if n_rows < 2:
        out = np.full(n_cols, np.nan)
        return out[0] if scalar else out
    work = np.float32 if a.dtype == np.float32 and b.dtype == np.float32 else np.float64
    sums = np.zeros((5, n_cols))  # sum a, sum b, sum a^2, sum b^2, sum ab of the shifted columns

    def accumulate(cols):
        a0 = np.asarray(a[:block_rows, cols], dtype=np.float64).mean(0).astype(work)
        b0 = np.asarray(b[:block_rows, cols], dtype=np.float64).mean(0).astype(work)
        s_a, s_b, s_aa, s_bb, s_ab = sums[:, cols]
        for start in range(0, n_rows, block_rows):
            da = np.asarray(a[start:start + block_rows, cols], dtype=work) - a0
            db = np.asarray(b[start:start + block_rows, cols], dtype=work) - b0
            s_a += da.sum(0)
            s_b += db.sum(0)
            s_aa += np.einsum("ij,ij->j", da, da)
            s_bb += np.einsum("ij,ij->j", db, db)
            s_ab += np.einsum("ij,ij->j", da, db)

    # numpy releases the GIL in these loops: column ranges run in parallel threads
    n_threads = max(1, min(os.cpu_count() or 1, n_cols // 2048))
    bounds = np.linspace(0, n_cols, n_threads + 1).astype(int)
    ranges = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if n_threads == 1:
        accumulate(ranges[0])
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(accumulate, ranges))
    s_a, s_b, s_aa, s_bb, s_ab = sums
    var_a, var_b = n_rows * s_aa - s_a * s_a, n_rows * s_bb - s_b * s_b
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (n_rows * s_ab - s_a * s_b) / np.sqrt(var_a * var_b)
        # shift more than a standard deviation from the mean (or no variance at all): redo exactly
        redo = np.flatnonzero(~((var_a > 0.5 * n_rows * s_aa) & (var_b > 0.5 * n_rows * s_bb)))
        if redo.size:
            x, y = np.asarray(a[:, redo], dtype=np.float64), np.asarray(b[:, redo], dtype=np.float64)
            constant = (x.max(0) == x.min(0)) | (y.max(0) == y.min(0))  # centring leaves noise, not 0
            x, y = x - x.mean(0), y - y.mean(0)
            r[redo] = np.where(constant, np.nan, np.einsum("ij,ij->j", x, y)
                               / np.sqrt(np.einsum("ij,ij->j", x, x) * np.einsum("ij,ij->j", y, y)))
    r = np.clip(r, -1.0, 1.0)
    return r[0] if scalar else r


def challenge_score(r, noise_ceiling):
    """Algonauts 2023 challenge score per vertex: 100 max(r, 0)^2 / NC capped at 100; NaN where NC <= 0 or not finite.

    noise_ceiling is the fraction (0..1) of variance explainable by the stimulus (utils.load_noise_ceiling
    converts percentages). As in the organisers' code a negative r scores 0 and a score above the ceiling
    is capped at 100; unlike it (which sets NC = 0 to 1e-14, scoring any r > 0 as 100), NC <= 0 gives NaN.
    """
    r = np.asarray(r, dtype=np.float64)
    nc = np.asarray(noise_ceiling, dtype=np.float64)
    if r.shape != nc.shape:
        raise ValueError(f"noise ceiling of shape {nc.shape} does not match the {r.shape} correlations; "
                         "expected one value per voxel")
    if np.nanmax(nc, initial=0.0) > 1.0:
        raise ValueError(f"noise ceiling up to {np.nanmax(nc):.3g}: expected a fraction of explainable "
                         "variance in 0..1 (divide percentages by 100)")
    out = np.full(r.shape, np.nan)
    ok = np.isfinite(nc) & (nc > 0)
    with np.errstate(invalid="ignore"):
        out[ok] = np.minimum(100.0 * np.maximum(r[ok], 0.0) ** 2 / nc[ok], 100.0)  # NaN r stays NaN
    return out


# -- Encoding core: ridge with one alpha per voxel, from one eigendecomposition --


@dataclass
class RidgeFit:
    """A fitted ridge encoding model: predictions = (X - x_mean_) @ coef_ + y_mean_ = X @ coef_ + intercept_."""
    coef_: np.ndarray | None  # features x voxels, float32 (None when fitted with compute_coef=False)
    intercept_: np.ndarray | None  # voxels, float32 (None likewise)
    x_mean_: np.ndarray       # features, float64 (train mean)
    y_mean_: np.ndarray       # voxels, float64 (train mean)
    alphas_: np.ndarray       # voxels: the alpha used for each voxel
    alpha_grid_: np.ndarray   # the candidate alphas (one value in fixed-alpha mode)
    val_scores_: np.ndarray | None  # n_alphas x voxels validation scores (None without a validation split)
    score: str                # 'r' (Pearson, higher is better) or 'mse' (lower is better): val_scores_
    gcv_scores_: np.ndarray | None = None  # n_alphas x voxels GCV on train (selection='gcv'; lower is better)
    selection: str = "val"    # how alphas_ were chosen: 'val' or 'gcv'
    val_fold_scores_: np.ndarray | None = None  # folds x n_alphas x voxels: val scores on each fold (val_folds)

    def predict(self, X) -> np.ndarray:
        """Predicted responses (images x voxels, float32) for features X (images x features)."""
        if self.coef_ is None:
            raise ValueError("this ridge fit has no coefficients (compute_coef=False); refit with "
                             "fit_ridge(..., voxel_alphas=fit.alphas_)")
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.coef_.shape[0]:
            raise ValueError(f"features of shape {X.shape}: expected images x {self.coef_.shape[0]} features")
        # centred form: accurate also for features with large means (ReLU activations)
        Xc = (X - self.x_mean_).astype(np.float32)
        return Xc @ self.coef_ + self.y_mean_.astype(np.float32)

    def _at_chosen(self, scores):
        return None if scores is None else scores[np.searchsorted(self.alpha_grid_, self.alphas_),
                                                  np.arange(scores.shape[1])]

    @property
    def best_val_scores_(self) -> np.ndarray | None:
        """Per-voxel validation score at the chosen alpha."""
        return self._at_chosen(self.val_scores_)

    @property
    def best_gcv_scores_(self) -> np.ndarray | None:
        """Per-voxel GCV score at the chosen alpha."""
        return self._at_chosen(self.gcv_scores_)

    def alpha_summary(self) -> dict:
        """How often each alpha was chosen, and the fraction of voxels at the grid's edges (widen it if large)."""
        counts = {f"{a:g}": int((self.alphas_ == a).sum()) for a in self.alpha_grid_}
        n = max(len(self.alphas_), 1)
        return {"counts": counts,
                "frac_at_lowest": float((self.alphas_ == self.alpha_grid_[0]).sum() / n),
                "frac_at_highest": float((self.alphas_ == self.alpha_grid_[-1]).sum() / n)}


def _as_matrix(arr, name: str) -> np.ndarray:
    arr = np.asarray(arr) if not _is_torch(arr) else arr.detach().cpu().numpy()
    if arr.ndim != 2:
        raise ValueError(f"{name} of shape {arr.shape}: expected a 2-D images x columns array")
    return arr


class _one_cpu_thread:
    """Run barrier-heavy LAPACK (eigh, QR) of small matrices on one CPU thread: on a shared VM a
    preempted second vCPU stalled a 1000 x 1000 eigh 100x (16 s instead of 0.1 s); one thread costs
    ~0.05 s there. No-op on GPU and for big matrices (size > 2048), where threads pay off."""

    def __init__(self, device, size: int = 0):
        self.active = device.type == "cpu" and size <= 2048

    def __enter__(self):
        import torch
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch
        if self.active:
            torch.set_num_threads(self.saved)


def _eigen_basis(Xc):
    """(V, s2): Xc^T Xc = V diag(s2) V^T, from the smaller of the two Gram matrices (float64)."""
    import torch
    n, p = Xc.shape
    if p <= n:
        gram = _mm(Xc.T, Xc)                        # numpy: BLAS syrk (half the products)
        with _one_cpu_thread(Xc.device, p):
            s2, V = torch.linalg.eigh(gram)
        return V, s2.clamp_min(0)
    # wide: eigh of the n x n kernel, V = Xc^T U / s on the non-null part
    kernel = _mm(Xc, Xc.T)
    with _one_cpu_thread(Xc.device, n):
        s2, U = torch.linalg.eigh(kernel)
    keep = s2 > s2.max().clamp_min(1e-300) * n * torch.finfo(torch.float64).eps
    s2, U = s2[keep], U[:, keep]
    return _mm(Xc.T, U) / s2.sqrt(), s2


def fit_ridge(X_train, Y_train, X_val=None, Y_val=None, alphas=ALPHAS, *, voxel_alphas=None,
              selection: str = "val", score: str = "r", compute_coef: bool = True, device=None,
              dtype: str = "float32", voxel_chunk: int = 4096, progress: bool = False, val_folds=None) -> RidgeFit:
    """Ridge regression with an intercept (by centring, like sklearn fit_intercept=True).

    alphas scalar: one fixed alpha for every voxel (the paper's mode, e.g. PAPER_ALPHA_UNTUNED).
    alphas a grid: each voxel takes its best alpha by `selection`:
    - 'val': best validation score (score='r': Pearson r of the val predictions; 'mse': mean squared
      val error) in val_scores_, so X_val, Y_val are required;
    - 'gcv': lowest generalized cross-validation on the train split, no val split (gcv_scores_):
      GCV(a) = n |y - yhat_a|^2 / (n - tr H_a)^2, H_a the train hat matrix including the unpenalised
      intercept (centring), so tr H_a = 1 + sum_k s_k^2 / (s_k^2 + a) over the centred singular values.
    voxel_alphas: a given alpha per voxel (overrides alphas; no selection).
    compute_coef=False: scores and chosen alphas only (coef_ and intercept_ None). To choose per voxel
    among several candidate feature sets (layers, backbones) without coefficients for the losers: fit
    each with compute_coef=False, take each voxel's candidate with the best best_val_scores_, then fit
    the winners on their voxels with voxel_alphas=fit.alphas_[voxels] (e.g. on train + val).
    All alphas and voxels share one eigendecomposition of the centred train Gram matrix; voxels are
    processed in chunks of voxel_chunk so memory stays flat. dtype: precision of the big matmuls.
    val_folds: a fold number (0..F-1) per val row: also score every alpha on each fold (val_fold_scores_), e.g. to
    choose alphas on one half of val and score on the other (cross-fitting) from one fit.
    """
    import torch
    if score not in ("r", "mse"):
        raise ValueError(f"score={score!r}: expected 'r' or 'mse'")
    if selection not in ("val", "gcv"):
        raise ValueError(f"selection={selection!r}: expected 'val' or 'gcv'")
    X = _as_matrix(X_train, "X_train")
    Y = _as_matrix(Y_train, "Y_train")
    n, p = X.shape
    v = Y.shape[1]
    if Y.shape[0] != n:
        raise ValueError(f"X_train has {n} rows but Y_train {Y.shape[0]}; expected one row per train image")
    if n < 2:
        raise ValueError(f"ridge needs at least 2 train images, got {n}")
    if voxel_alphas is not None:
        voxel_alphas = np.asarray(voxel_alphas, dtype=np.float64).ravel()
        if voxel_alphas.shape != (v,):
            raise ValueError(f"voxel_alphas has {voxel_alphas.size} values, expected one per voxel ({v})")
        grid, chosen = np.unique(voxel_alphas, return_inverse=True)
        select = False
    else:
        grid = np.sort(np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel())
        chosen = np.zeros(v, dtype=np.int64)
        select = grid.size > 1
    if not (np.isfinite(grid).all() and (grid > 0).all()) or grid.size == 0:
        raise ValueError(f"alphas {grid.tolist()}: expected finite values > 0")
    has_val = X_val is not None and Y_val is not None
    gcv = selection == "gcv" and voxel_alphas is None
    if gcv and has_val:
        raise ValueError("selection='gcv' chooses alphas on the train split alone: pass no X_val, Y_val "
                         "(fit on train + val), or use selection='val'")
    if select and not (has_val or gcv):
        raise ValueError("choosing an alpha per voxel needs a validation split (X_val, Y_val) or "
                         "selection='gcv'; or pass one alpha (fixed-alpha mode)")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float64'")
    dev = _device(device)
    f64 = torch.float64
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=dev)
    if not torch.isfinite(Xt).all():
        raise ValueError("X_train: non-finite feature values (NaN or inf)")
    x_mean = Xt.mean(0)
    Xc = Xt - x_mean
    V, s2 = _eigen_basis(Xc)
    tw = getattr(torch, dtype)
    A_train = _mm(Xc.to(tw), V.to(tw))              # n x k = U diag(s), centred
    del Xt, Xc
    alphas_t = torch.as_tensor(grid, dtype=f64, device=dev)[:, None]
    D = 1.0 / (s2[None, :] + alphas_t)               # alphas x k: d_a = 1 / (s^2 + a)
    # |y_c - H y_c|^2 = |y_c|^2 - sum_k z_k^2 d_k (1 + a d_k) with z = A^T y; tr H = 1 + sum_k s_k^2 d_k
    gcv_weights, gcv_denominator = D * (1 + alphas_t * D), ((n - 1 - (s2 * D).sum(1)) ** 2 / n).cpu().numpy()
    # the voxel loop: numpy on CPU (its BLAS and elementwise ops measured 1.2-3x torch's on the
    # 2-core EPYC), torch on GPU; the per-voxel statistics and scores in float64 numpy on the host
    if dev.type == "cpu":
        xp, loop, host = np, (lambda t: t.numpy()), (lambda x: x)
    else:
        xp, loop, host = torch, (lambda t: t), (lambda x: x.cpu().numpy())
    A_train, V_w, Dt, gcv_weights = loop(A_train), loop(V.to(tw)), loop(D.T.contiguous().to(tw)), loop(gcv_weights)

    if has_val:
        Xv = _as_matrix(X_val, "X_val")
        Yv_all = _as_matrix(Y_val, "Y_val")
        if Xv.shape[1] != p or Yv_all.shape != (Xv.shape[0], v):
            raise ValueError(f"validation split of shapes X {Xv.shape}, Y {Yv_all.shape}: expected "
                                  f"images x {p} features and images x {v} voxels with the same rows")
        Xv_t = torch.as_tensor(np.asarray(Xv, dtype=np.float64), device=dev)
        if not torch.isfinite(Xv_t).all():
            raise ValueError("X_val: non-finite feature values (NaN or inf)")
        # the whole val split, or each fold (the whole split's scores then follow from the folds' sums):
        # (rows, A_val, stacked blocks of R diag(d_a))
        groups = [np.arange(Xv.shape[0])]
        if val_folds is not None:
            val_folds = np.asarray(val_folds).ravel()
            if val_folds.shape != (Xv.shape[0],) or val_folds.min(initial=0) < 0:
                raise ValueError(f"val_folds of shape {val_folds.shape}: expected one fold number >= 0 per val row")
            groups = [np.flatnonzero(val_folds == f) for f in range(int(val_folds.max(initial=-1)) + 1)]
            if score == "r":  # each fold's predictions are centred on the fold's mean; its offset from the whole
                # split's mean prediction is (mean_fold(x) - mean_val(x)) V diag(d_a) Z: (folds * alphas) x k here
                means = torch.stack([Xv_t[torch.as_tensor(rows, device=dev)].mean(0) for rows in groups])
                fold_offsets = loop((((means - Xv_t.mean(0)) @ V)[:, None, :] * D[None]).reshape(-1, len(s2)).to(tw))
        val_parts = []
        for rows in groups:
            Xg = Xv_t[torch.as_tensor(rows, device=dev)]
            # r: centre val predictions on their own mean; mse: predictions with the train intercept
            A_val = _mm(Xg - (Xg.mean(0) if score == "r" else x_mean), V)   # n_val x k
            # |A_val w|^2 = |R w|^2 with A_val = QR: R is upper triangular (k x k at most), so the
            # prediction norms of all alphas cost about half the val predictions (_val_sq_norms)
            with _one_cpu_thread(dev, p):
                R_val = torch.linalg.qr(A_val, mode="r").R
            val_parts.append((rows, loop(A_val.to(tw)),
                              [(lo, loop(block.to(tw))) for lo, block in _stacked_triangular_blocks(R_val, D)]))
        del Xv_t
    # a numpy block (maybe a strided view or read-only memmap) in the loop's dtype, on the device
    on_device = ((lambda a: np.asarray(a, dtype=dtype)) if xp is np
                 else (lambda a: torch.as_tensor(np.array(a, dtype=dtype), device=dev)))
    x_mean = x_mean.cpu().numpy()

    coef = np.empty((p, v), dtype=np.float32) if compute_coef else None
    intercept = np.empty(v, dtype=np.float32) if compute_coef else None
    y_mean = np.empty(v, dtype=np.float64)
    val_scores = np.empty((grid.size, v), dtype=np.float32) if (has_val and voxel_alphas is None) else None
    fold_scores = (np.empty((len(val_parts), grid.size, v), dtype=np.float32)
                   if val_scores is not None and val_folds is not None else None)
    gcv_scores = np.empty((grid.size, v), dtype=np.float32) if gcv else None

    starts = range(0, v, voxel_chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="ridge voxel chunks", unit="chunk")
    for start in starts:
        cols = slice(start, min(start + voxel_chunk, v))
        ym, yy = _column_moments(Y[:, cols], squares=gcv)
        if not np.isfinite(ym).all():  # a NaN/inf anywhere in a column makes its mean non-finite
            raise ValueError(f"Y_train: non-finite responses (NaN or inf) in voxels {cols.start}..{cols.stop - 1}")
        y_mean[cols] = ym
        Z = A_train.T @ on_device(Y[:, cols])        # k x vc; Y needs no centring (A_train is centred)
        if gcv:
            Z2 = Z.astype(np.float64) if xp is np else Z.to(torch.float64)
            scores = np.clip(yy - host(gcv_weights @ (Z2 * Z2)), 0, None) / gcv_denominator[:, None]
            scores[:, yy == 0] = np.nan               # constant train voxel: every alpha fits it exactly
            gcv_scores[:, cols] = scores
            scores = -scores                         # higher is better below
        if val_scores is not None:
            Yv_chunk = np.array(Yv_all[:, cols], dtype=np.float64)
            sums = []  # per group: (rows, mean y, |y_c|^2, cross terms, |predictions|^2)
            for g, (rows, A_val, val_blocks) in enumerate(val_parts):
                Yv = Yv_chunk[rows]
                y_bar = Yv.mean(0)
                val_constant = Yv.max(0) == Yv.min(0)     # r undefined (centring leaves rounding noise, not 0)
                Yv -= y_bar if score == "r" else ym
                yy_val = np.einsum("ij,ij->j", Yv, Yv)
                # cross terms of all alphas at once: sum_i P_a[i,j] Yv[i,j] = sum_k d_a[k] Z[k,j] C[k,j]
                cross = host(Dt.T @ (Z * (A_val.T @ on_device(Yv)))).astype(np.float64)  # alphas x vc
                pp = host(_val_sq_norms(val_blocks, Z, grid.size)).astype(np.float64)  # |val predictions|^2
                scores = _val_scores(cross, pp, yy_val, val_constant, len(rows), score)
                if fold_scores is None:
                    val_scores[:, cols] = scores
                    continue
                fold_scores[g][:, cols] = scores
                sums.append((len(rows), y_bar, yy_val, cross, pp))
            if fold_scores is not None:  # the whole val split from the folds' sums
                n_val = sum(s[0] for s in sums)
                cross, pp, yy_val = (sum(s[k] for s in sums) for k in (3, 4, 2))
                if score == "r":  # + the folds' offsets from the whole split's means (predictions and y)
                    offsets = host(fold_offsets @ Z).astype(np.float64).reshape(len(sums), grid.size, -1)
                    y_bar = sum(s[0] * s[1] for s in sums) / n_val
                    for (n_f, y_f, *_), offset in zip(sums, offsets):
                        cross = cross + n_f * offset * (y_f - y_bar)
                        pp = pp + n_f * offset ** 2
                        yy_val = yy_val + n_f * (y_f - y_bar) ** 2
                val_scores[:, cols] = _val_scores(cross, pp, yy_val, Yv_chunk.max(0) == Yv_chunk.min(0), n_val,
                                                  score)
            scores = val_scores[:, cols] if score == "r" else -val_scores[:, cols]
        if select:
            ranked = np.nan_to_num(scores, nan=-np.inf)
            # no finite score (e.g. constant voxel): the most shrinkage
            chosen[cols] = np.where(np.isfinite(ranked).any(0), ranked.argmax(0), grid.size - 1)
        if compute_coef:
            idx = chosen[cols] if xp is np else torch.as_tensor(chosen[cols], device=dev)
            coef_c = host(V_w @ (Dt[:, idx] * Z))    # V diag(d_alpha(voxel)) Z
            coef[:, cols] = coef_c
            intercept[cols] = ym - x_mean @ coef_c.astype(np.float64)
    return RidgeFit(coef_=coef, intercept_=intercept, x_mean_=x_mean, y_mean_=y_mean,
                    alphas_=grid[chosen], alpha_grid_=grid, val_scores_=val_scores, score=score,
                    gcv_scores_=gcv_scores, selection=selection if select else "val", val_fold_scores_=fold_scores)


def _val_scores(cross, pp, yy_val, constant, n_rows: int, score: str) -> np.ndarray:
    """alphas x voxels val scores from the sums: r (NaN for a constant voxel) or the mean squared error."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if score == "r":
            scores = cross / np.sqrt(pp * yy_val)
            scores[:, constant] = np.nan
            return scores
        return np.clip(yy_val - 2 * cross + pp, 0, None) / n_rows


def _column_moments(Y, squares: bool, block_rows: int = 256):
    """Per-column mean and (squares=True) |y - mean|^2 of a images x voxels numpy block, float64.

    One pass in row blocks, shifted by the first row (little cancellation; exactly 0 for a constant
    column); float32 data summed in float32 within a block and float64 across (~5x torch's CPU here).
    """
    work = np.float32 if Y.dtype == np.float32 else np.float64
    y0 = np.asarray(Y[0], dtype=work)
    s1, s2 = np.zeros(Y.shape[1]), np.zeros(Y.shape[1])
    for start in range(0, Y.shape[0], block_rows):
        d = np.asarray(Y[start:start + block_rows], dtype=work) - y0
        s1 += d.sum(0)
        if squares:
            s2 += np.einsum("ij,ij->j", d, d)
    n = Y.shape[0]
    return y0 + s1 / n, (s2 - s1 * s1 / n if squares else None)


def _stacked_triangular_blocks(R, D, n_blocks: int = 8):
    """Row blocks of R diag(d_a) for all alphas a, stacked: [(first column lo, (alphas * rows) x (k - lo))].

    R upper triangular (or trapezoidal): block rows lo..hi are zero left of column lo, so the blocks
    hold 9/16 of R's entries per alpha (n_blocks = 8). Built once per fit, in float64.
    """
    edges = [round(i * R.shape[0] / n_blocks) for i in range(n_blocks + 1)]
    return [(lo, (R[None, lo:hi, lo:] * D[:, None, lo:]).reshape(D.shape[0] * (hi - lo), -1))
            for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _val_sq_norms(blocks, Z, n_alphas: int):
    """Column squared norms |R diag(d_a) Z|^2 for every alpha a (alphas x voxels) from the stacked blocks.

    One large product per row block for all alphas: on the 2-core EPYC under load 1.2x faster than
    stacking diag(d_a) Z side by side (R @ [d_1 Z, ..., d_7 Z]), itself 1.1-1.5x faster than one product
    per alpha and block and 1.3x faster than A_val @ (D * Z) for all alphas in one batched product.
    """
    einsum = np.einsum if isinstance(Z, np.ndarray) else __import__("torch").einsum
    total = 0
    for lo, block in blocks:
        P = (block @ Z[lo:]).reshape(n_alphas, -1, Z.shape[1])
        total = total + einsum("aij,aij->aj", P, P)
    return total


def _mm(a, b):
    """a @ b of torch tensors; on CPU through numpy's OpenBLAS (1.2-1.4x torch's MKL on the 2-core EPYC)."""
    if a.device.type != "cpu":
        return a @ b
    import torch
    return torch.from_numpy(a.numpy() @ b.numpy())


def _device(device):
    """A torch device: None / 'auto' = cuda when present, else cpu."""
    import torch
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- Encoding core: feature scaling --


def unit_scale(features: dict) -> dict:
    """Features of every split divided by one scalar so train features have mean variance 1.

    Keeps PCA's variance ordering while putting every layer and backbone on the scale the per-voxel
    alpha grid is written for (eigenvalues of X^T X around n_train).
    """
    scale = float(np.sqrt(np.mean(np.var(features["train"], axis=0, dtype=np.float64))))
    scale = scale if scale > 0 else 1.0
    return {name: (x / scale).astype(np.float32) for name, x in features.items()}
