"""Encoding models and result statistics: Pearson r, PCA, per-voxel-alpha ridge, ROI summaries, paired tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import utils

# ---- Encoding core ----
#
# Conventions of this section:
# - arrays are images x voxels (rows = stimuli, columns = voxels/vertices), features images x features;
# - a per-voxel score that cannot be computed (constant column, empty set) is NaN, never a silent 0,
#   and summaries count the NaNs and leave them out;
# - ridge runs in torch (GPU when present), big matmuls in float32, the small decompositions in float64.

# Fixed alphas of the paper's seed-compatible mode.
PAPER_ALPHA_UNTUNED = 1e3   # untuned (ImageNet) features reduced to PCA(1000)
PAPER_ALPHA_TUNED = 1e4     # fine-tuned model, classifier.6 features
# Default per-voxel alpha grid. alpha competes with the eigenvalues of the centred train Gram matrix
# X^T X (n_train x the feature variance along each principal axis): ~7.5e3 on average for standardised
# features and ~7,500 train images; unnormalised activations and their PCA scores are larger and spread
# over many decades. One alpha per decade from 1 (nearly OLS for such features) to 1e8 (nearly all
# shrunk to the intercept: right for voxels without signal) brackets the paper's fixed 1e3 and 1e4 by
# 3-4 decades either side; RidgeFit.alpha_summary() says how many voxels sit at an edge (then widen it).
DEFAULT_ALPHAS = np.logspace(0, 8, 9)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def pearson_r(y_true, y_pred, block_rows: int = 32):
    """Pearson r of each column (voxel) of y_true vs y_pred.

    numpy in -> float64 numpy out; torch in -> float64 tensor on the same device. 1-D inputs give a
    scalar. A column that is constant in either input (or has fewer than 2 rows) gives NaN.
    One pass over the rows in cache-sized blocks, column ranges in parallel threads: columns are
    shifted by their mean over the first block (so sums of squares barely cancel), float32 products
    are summed in float32 within a block of block_rows rows and in float64 across blocks (|error|
    < ~5e-7 on r, the resolution of float32 data); other dtypes run in float64 throughout. The rare
    column whose first block is far from its overall mean, and any constant column, is redone exactly.
    """
    if _is_torch(y_true) or _is_torch(y_pred):
        return _pearson_r_torch(y_true, y_pred)
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
        r[redo] = _pearson_r_exact(np.asarray(a[:, redo], dtype=np.float64), np.asarray(b[:, redo], dtype=np.float64))
    r = np.clip(r, -1.0, 1.0)
    return r[0] if scalar else r


def _pearson_r_exact(a, b):
    """Two-pass float64 Pearson r per column; NaN where a column is constant (max == min exactly)."""
    x, y = a - a.mean(0), b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ij,ij->j", x, y) / np.sqrt(np.einsum("ij,ij->j", x, x) * np.einsum("ij,ij->j", y, y))
    r[(a.max(0) == a.min(0)) | (b.max(0) == b.min(0))] = np.nan
    return r


def _pearson_r_torch(y_true, y_pred):
    import torch
    a = torch.as_tensor(y_true)
    b = torch.as_tensor(y_pred, device=a.device)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"pearson_r: y_true {tuple(a.shape)} and y_pred {tuple(b.shape)} must be the same "
                         "1-D or 2-D shape")
    scalar = a.ndim == 1
    if scalar:
        a, b = a[:, None], b[:, None]
    if a.shape[0] < 2:
        out = torch.full((a.shape[1],), float("nan"), dtype=torch.float64, device=a.device)
        return out[0] if scalar else out
    constant = (a.amax(0) == a.amin(0)) | (b.amax(0) == b.amin(0))
    x = a.double() - a.double().mean(0)
    y = b.double() - b.double().mean(0)
    r = (x * y).sum(0) / torch.sqrt((x * x).sum(0) * (y * y).sum(0))
    r = torch.where(constant, torch.full_like(r, float("nan")), r.clamp(-1.0, 1.0))
    return r[0] if scalar else r


def summarize_r(r) -> dict:
    """Mean, median, std, min, max of per-voxel r over the finite values, with counts of all and of NaNs."""
    r = np.asarray(r, dtype=np.float64).ravel()
    finite = r[np.isfinite(r)]
    stats = {"n": int(r.size), "n_valid": int(finite.size), "n_nan": int(r.size - finite.size)}
    for name, fn in (("mean", np.mean), ("median", np.median), ("std", np.std), ("min", np.min), ("max", np.max)):
        stats[name] = float(fn(finite)) if finite.size else float("nan")
    return stats


def noise_normalized(r, noise_ceiling):
    """Noise-ceiling-normalised accuracy r^2 / nc per voxel (Algonauts 2023 convention; can exceed 1).

    nc is the fraction (0..1) of variance explainable by the stimulus; nc <= 0 or non-finite -> NaN.
    The sign of r is lost (a negative r scores like a positive one), as in the challenge metric.
    """
    r = np.asarray(r, dtype=np.float64)
    nc = np.asarray(noise_ceiling, dtype=np.float64)
    if r.shape != nc.shape:
        raise utils.DataError(f"noise ceiling of shape {nc.shape} does not match the {r.shape} correlations; "
                              "expected one value per voxel")
    if np.nanmax(nc, initial=0.0) > 1.0:
        raise utils.DataError(f"noise ceiling up to {np.nanmax(nc):.3g}: expected a fraction of explainable "
                              "variance in 0..1 (divide percentages by 100)")
    out = np.full(r.shape, np.nan)
    ok = np.isfinite(nc) & (nc > 0)
    out[ok] = r[ok] ** 2 / nc[ok]
    return out


# -- Encoding core: PCA (fit on train only) --


def fit_pca(X_train, n_components: int = 1000, seed: int = 0):
    """sklearn's randomized PCA fitted on the train rows only; use its .transform on every split.

    n_components is capped at min(n_images, n_features) (beyond that PCA is a rotation and changes no
    ridge prediction). A torch port measured 1.7x slower than sklearn on the 2-core CPU, so none is kept.
    """
    X_train = X_train if _is_torch(X_train) else np.asarray(X_train)
    if X_train.ndim != 2 or X_train.shape[0] < 2:
        raise utils.DataError(f"PCA input of shape {tuple(X_train.shape)}: expected images x features with >= 2 images")
    n_components = int(min(n_components, *X_train.shape))
    from sklearn.decomposition import PCA
    return PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(X_train)


# -- Encoding core: ridge with one alpha per voxel, from one eigendecomposition --


@dataclass
class RidgeFit:
    """A fitted ridge encoding model: predictions = (X - x_mean_) @ coef_ + y_mean_ = X @ coef_ + intercept_."""
    coef_: np.ndarray         # features x voxels, float32
    intercept_: np.ndarray    # voxels, float32
    x_mean_: np.ndarray       # features, float64 (train mean)
    y_mean_: np.ndarray       # voxels, float64 (train mean)
    alphas_: np.ndarray       # voxels: the alpha used for each voxel
    alpha_grid_: np.ndarray   # the candidate alphas (one value in fixed-alpha mode)
    val_scores_: np.ndarray | None  # n_alphas x voxels validation scores (None without a validation split)
    score: str                # 'r' (Pearson, higher is better) or 'mse' (lower is better)

    def predict(self, X) -> np.ndarray:
        """Predicted responses (images x voxels, float32) for features X (images x features)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.coef_.shape[0]:
            raise utils.DataError(f"features of shape {X.shape}: expected images x {self.coef_.shape[0]} features")
        # centred form: accurate also for features with large means (ReLU activations)
        Xc = (X - self.x_mean_).astype(np.float32)
        return Xc @ self.coef_ + self.y_mean_.astype(np.float32)

    @property
    def best_val_scores_(self) -> np.ndarray | None:
        """Per-voxel validation score at the chosen alpha."""
        if self.val_scores_ is None:
            return None
        idx = np.searchsorted(self.alpha_grid_, self.alphas_)
        return self.val_scores_[idx, np.arange(self.val_scores_.shape[1])]

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
        raise utils.DataError(f"{name} of shape {arr.shape}: expected a 2-D images x columns array")
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
        gram = Xc.T @ Xc
        with _one_cpu_thread(Xc.device, p):
            s2, V = torch.linalg.eigh(gram)
        return V, s2.clamp_min(0)
    # wide: eigh of the n x n kernel, V = Xc^T U / s on the non-null part
    kernel = Xc @ Xc.T
    with _one_cpu_thread(Xc.device, n):
        s2, U = torch.linalg.eigh(kernel)
    keep = s2 > s2.max().clamp_min(1e-300) * n * torch.finfo(torch.float64).eps
    s2, U = s2[keep], U[:, keep]
    return (Xc.T @ U) / s2.sqrt(), s2


def fit_ridge(X_train, Y_train, X_val=None, Y_val=None, alphas=DEFAULT_ALPHAS, *, voxel_alphas=None,
              score: str = "r", device=None, dtype: str = "float32", voxel_chunk: int = 4096,
              progress: bool = False) -> RidgeFit:
    """Ridge regression with an intercept (by centring, like sklearn fit_intercept=True).

    alphas scalar: one fixed alpha for every voxel (the paper's mode, e.g. PAPER_ALPHA_UNTUNED).
    alphas a grid: each voxel takes the alpha with the best validation score (score='r': Pearson r of
    the val predictions; 'mse': mean squared val error), so X_val, Y_val are required.
    voxel_alphas: a given alpha per voxel (overrides alphas; no selection).
    All alphas and voxels share one eigendecomposition of the centred train Gram matrix; voxels are
    processed in chunks of voxel_chunk so memory stays flat. dtype: precision of the big matmuls.
    """
    import torch
    if score not in ("r", "mse"):
        raise ValueError(f"score={score!r}: expected 'r' or 'mse'")
    X = _as_matrix(X_train, "X_train")
    Y = _as_matrix(Y_train, "Y_train")
    n, p = X.shape
    v = Y.shape[1]
    if Y.shape[0] != n:
        raise utils.DataError(f"X_train has {n} rows but Y_train {Y.shape[0]}; expected one row per train image")
    if n < 2:
        raise utils.DataError(f"ridge needs at least 2 train images, got {n}")
    if voxel_alphas is not None:
        voxel_alphas = np.asarray(voxel_alphas, dtype=np.float64).ravel()
        if voxel_alphas.shape != (v,):
            raise ValueError(f"voxel_alphas has {voxel_alphas.size} values, expected one per voxel ({v})")
        grid, chosen = np.unique(voxel_alphas, return_inverse=True)
        select = False
    else:
        grid = np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel()
        chosen = np.zeros(v, dtype=np.int64)
        select = grid.size > 1
        grid = np.sort(grid)
    if not (np.isfinite(grid).all() and (grid > 0).all()) or grid.size == 0:
        raise ValueError(f"alphas {grid.tolist()}: expected finite values > 0")
    has_val = X_val is not None and Y_val is not None
    if select and not has_val:
        raise ValueError("choosing an alpha per voxel needs a validation split (X_val, Y_val); "
                         "or pass one alpha (fixed-alpha mode)")
    dev = utils.resolve_device(device)
    work = {"float32": torch.float32, "float64": torch.float64}[dtype]
    f64 = torch.float64

    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=dev)
    if not torch.isfinite(Xt).all():
        raise utils.DataError("X_train: non-finite feature values (NaN or inf)")
    x_mean = Xt.mean(0)
    Xc = Xt - x_mean
    V, s2 = _eigen_basis(Xc)
    A_train = (Xc @ V).to(work)                      # n x k = U diag(s); columns sum to zero
    del Xt, Xc
    D = (1.0 / (s2[None, :] + torch.as_tensor(grid, dtype=f64, device=dev)[:, None])).to(work)  # alphas x k
    V_w = V.to(work)

    if has_val:
        Xv = _as_matrix(X_val, "X_val")
        Yv_all = _as_matrix(Y_val, "Y_val")
        if Xv.shape[1] != p or Yv_all.shape != (Xv.shape[0], v):
            raise utils.DataError(f"validation split of shapes X {Xv.shape}, Y {Yv_all.shape}: expected "
                                  f"images x {p} features and images x {v} voxels with the same rows")
        Xv_t = torch.as_tensor(np.asarray(Xv, dtype=np.float64), device=dev)
        if not torch.isfinite(Xv_t).all():
            raise utils.DataError("X_val: non-finite feature values (NaN or inf)")
        # r: centre val predictions on their own mean; mse: predictions with the train intercept
        shift = Xv_t.mean(0) if score == "r" else x_mean
        A_val64 = (Xv_t - shift) @ V                 # n_val x k
        # |A_val w|^2 = |R w|^2 with A_val = QR: R is upper triangular, so the per-alpha prediction
        # norms cost about 5/8 of the val predictions themselves (blocked in _triangular_sq_norms)
        with _one_cpu_thread(dev, A_val64.shape[1]):
            R_val = torch.linalg.qr(A_val64, mode="r").R.to(work)
        A_val, n_val = A_val64.to(work), Xv.shape[0]
        del Xv_t, A_val64
    coef = np.empty((p, v), dtype=np.float32)
    y_mean = np.empty(v, dtype=np.float64)
    intercept = np.empty(v, dtype=np.float32)
    val_scores = np.empty((grid.size, v), dtype=np.float32) if (has_val and voxel_alphas is None) else None

    starts = range(0, v, voxel_chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="ridge voxel chunks", unit="chunk")
    for start in starts:
        cols = slice(start, min(start + voxel_chunk, v))
        Yc = _to_tensor(Y[:, cols], dev, work)
        # torch's float32 sum is cascaded (accurate); sum(dtype=float64) would copy the block to float64.
        # A NaN/inf anywhere in a column makes its sum non-finite: the finiteness check for free.
        ym = Yc.sum(0).to(f64) / n
        if not torch.isfinite(ym).all():
            raise utils.DataError(f"Y_train: non-finite responses (NaN or inf) in voxels {cols.start}..{cols.stop - 1}")
        y_mean[cols] = ym.cpu().numpy()
        Z = A_train.T @ Yc                           # k x vc; Y needs no centring (A_train is centred)
        del Yc
        if val_scores is not None:
            Yv = _to_tensor(Yv_all[:, cols], dev, f64)
            val_constant = Yv.amax(0) == Yv.amin(0)   # r undefined (centring leaves rounding noise, not 0)
            Yv = Yv - (Yv.mean(0) if score == "r" else ym)
            yy = (Yv * Yv).sum(0)
            # cross terms of all alphas at once: sum_i P_a[i,j] Yv[i,j] = sum_k d_a[k] Z[k,j] C[k,j]
            cross = (D @ (Z * (A_val.T @ Yv.to(work)))).to(f64)   # alphas x vc
            scores = torch.empty((grid.size, Z.shape[1]), dtype=f64, device=dev)
            for a in range(grid.size):
                pp = _triangular_sq_norms(R_val, D[a][:, None] * Z).to(f64)  # |val predictions|^2
                if score == "r":
                    scores[a] = cross[a] / torch.sqrt(pp * yy)     # NaN where a column is constant
                else:
                    scores[a] = (yy - 2 * cross[a] + pp).clamp_min(0) / n_val
            if score == "r":
                scores[:, val_constant] = float("nan")
            val_scores[:, cols] = scores.cpu().numpy()
            if select:
                ranked = torch.nan_to_num(scores if score == "r" else -scores, nan=-np.inf)
                best = ranked.argmax(0)
                best = torch.where(torch.isfinite(ranked).any(0), best, grid.size - 1)  # no score: most shrinkage
                chosen[cols] = best.cpu().numpy()
        idx = torch.as_tensor(chosen[cols], device=dev)
        coef_c = V_w @ (D[idx].T * Z)                # V diag(d_alpha(voxel)) Z
        coef[:, cols] = coef_c.cpu().numpy()
        intercept[cols] = (ym - x_mean @ coef_c.to(f64)).cpu().numpy()
    return RidgeFit(coef_=coef, intercept_=intercept, x_mean_=x_mean.cpu().numpy(), y_mean_=y_mean,
                    alphas_=grid[chosen], alpha_grid_=grid, val_scores_=val_scores, score=score)


def _triangular_sq_norms(R, W, n_blocks: int = 4):
    """Column squared norms of R @ W for upper-triangular (or trapezoidal) R, skipping R's zero blocks."""
    edges = [round(i * R.shape[0] / n_blocks) for i in range(n_blocks + 1)]
    total = 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            total = total + (R[lo:hi, lo:] @ W[lo:]).square().sum(0)
    return total


def _to_tensor(arr, dev, dtype):
    """A numpy block (possibly a strided view or read-only memmap) as a torch tensor on dev."""
    import torch
    arr = np.asarray(arr)
    if not arr.flags.writeable or arr.dtype not in (np.float32, np.float64):
        arr = np.array(arr, dtype=np.float32 if dtype == torch.float32 else np.float64)
    return torch.as_tensor(arr).to(device=dev, dtype=dtype)


# -- Encoding core: per-ROI summaries and paired statistics --


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
    group_of = {roi: g for g, rois in utils.ROI_GROUPS.items() for roi in rois}
    rows = []
    for roi, idx in roi_indices.items():
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= n_total):
            raise utils.DataError(f"ROI {roi}: voxel index {int(idx.max())} out of range for {n_total} voxels")
        base = arrays[baseline][idx] if baseline is not None else None
        for method, r_all in arrays.items():
            r = r_all[idx]
            finite = r[np.isfinite(r)]
            row = {"roi": roi, "group": group_of.get(roi, ""), "method": method, "n_voxels": int(idx.size),
                   "n_valid": int(finite.size),
                   "mean_r": float(finite.mean()) if finite.size else float("nan"),
                   "median_r": float(np.median(finite)) if finite.size else float("nan"),
                   "pct_improved": float("nan")}
            if base is not None and method != baseline:
                both = np.isfinite(r) & np.isfinite(base)
                if both.any():
                    row["pct_improved"] = float(100.0 * (r[both] > base[both]).mean())
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
    observed = float(np.nanmedian(pearson_r(y, a)) - np.nanmedian(pearson_r(y, b)))
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


def make_synthetic_encoding_data(n_train: int = 800, n_val: int = 200, n_test: int = 300, n_features: int = 100,
                                 n_voxels: int = 500, rank: int = 20, seed: int = 0) -> dict:
    """Features and responses with a planted low-rank linear signal (float32 arrays).

    Features mix `rank` latent factors with unequal scales (unnormalised, spread-out eigenvalues);
    each voxel reads the latents with its own signal strength (some none), so the best alpha varies.
    Returns X_train, Y_train, X_val, Y_val, X_test, Y_test.
    """
    rng = np.random.default_rng(seed)
    n_all = n_train + n_val + n_test
    latents = rng.standard_normal((n_all, rank), dtype=np.float32)
    mixing = rng.standard_normal((rank, n_features), dtype=np.float32)
    scales = np.logspace(0, -2, n_features).astype(np.float32)
    X = (latents @ mixing + rng.standard_normal((n_all, n_features), dtype=np.float32)) * scales + 0.5
    readout = rng.standard_normal((rank, n_voxels), dtype=np.float32) / np.float32(np.sqrt(rank))
    readout *= np.linspace(0.0, 1.0, n_voxels, dtype=np.float32)  # signal strength 0 .. 1 across voxels
    Y = latents @ readout
    for start in range(0, n_all, 2048):  # add noise in row blocks to avoid a second full-size temporary
        Y[start:start + 2048] += rng.standard_normal((min(2048, n_all - start), n_voxels), dtype=np.float32)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    out = {}
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:]):
        out[f"X_{name}"], out[f"Y_{name}"] = X[lo:hi], Y[lo:hi]
    return out


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def time_ridge_fit(method: str, n_train: int, n_val: int, n_features: int, n_voxels: int, n_alphas: int,
                   seed: int = 0, repeats: int = 3) -> dict:
    """Make synthetic data, then time one ridge method: 'ours' (per-voxel alpha), 'sklearn_ridge' (one
    fixed alpha), or 'sklearn_ridgecv' (alpha_per_target, LOO on train). Returns times, peak memory, dtypes.

    Meant to run in a fresh process (run_in_child) so the peak memory is this fit's alone.
    """
    data = make_synthetic_encoding_data(n_train, n_val, 0, n_features, n_voxels, seed=seed)
    alphas = np.logspace(1, 7, n_alphas)
    data_rss = peak_rss_gb()
    times, cpu_times, info = [], [], {}
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "ours":
            fit = fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], alphas=alphas)
            info = {"dtype": "float32 (torch)", "alpha_summary": fit.alpha_summary()}
        elif method == "sklearn_ridge":
            from sklearn.linear_model import Ridge
            fit = Ridge(alpha=PAPER_ALPHA_UNTUNED).fit(data["X_train"], data["Y_train"])
            info = {"dtype": str(fit.coef_.dtype), "solver": fit.solver_}
        elif method == "sklearn_ridgecv":
            from sklearn.linear_model import RidgeCV
            fit = RidgeCV(alphas=alphas, alpha_per_target=True).fit(data["X_train"], data["Y_train"])
            info = {"dtype": str(fit.coef_.dtype)}
        else:
            raise ValueError(f"unknown method {method!r}")
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del fit
    return {"method": method, "times_s": times, "cpu_s": cpu_times, "median_s": float(np.median(times)),
            "data_rss_gb": data_rss, "peak_rss_gb": peak_rss_gb(), **info}


def run_in_child(function: str, **kwargs) -> dict:
    """Run results_utils.<function>(**kwargs) in a fresh Python process and return its JSON-able dict."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import results_utils as ru; "
            "print('@@RESULT@@' + json.dumps(getattr(ru, sys.argv[2])(**json.loads(sys.argv[3]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), function,
                           json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {function}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
    return json.loads(line[len("@@RESULT@@"):])

# ---- Features: one cached extractor for untuned and tuned backbones ----

def backbone_spec_tag(spec: str) -> str:
    """A short, readable cache tag for a backbone: 'untuned-<weights>' or '<checkpoint dir>-<hash>'.

    spec is 'untuned:<weights>' or the path of a CL/reg checkpoint (its size and mtime enter the hash,
    so a retrained model never reuses stale features).
    """
    import hashlib
    if spec.startswith("untuned:"):
        weights = spec.split(":", 1)[1]
        key = weights
        if Path(weights).is_file():
            st = Path(weights).stat()
            key = f"{Path(weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        name = Path(weights).stem if Path(weights).suffix else weights
        return f"untuned-{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    path = Path(spec)
    if not path.is_file():
        raise utils.DataError(f"{path}: model checkpoint not found")
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    parts = path.parent.parts[-4:]  # method / subjXX / hemi / roi
    return "-".join(parts + (path.stem, hashlib.sha1(key.encode()).hexdigest()[:8]))


def load_backbone(spec: str, device):
    """The AlexNet a spec names: untuned with its weights, or the tuned backbone of a checkpoint."""
    import models
    if spec.startswith("untuned:"):
        import torch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # weights=none: the same random init in every stage and process
            return models.build_alexnet(spec.split(":", 1)[1]).to(device).eval()
    return models.load_tuned_backbone(spec, device).eval()


def _indices_hash(indices) -> str:
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:10]


def layer_features(out_dir, subject: int, spec: str, layers, image_cache, split: dict, split_names,
                   image_size: int, pca_components: int = 1000, seed: int = 0, device=None,
                   batch_size: int = 128, memory_gb: float = 8.0) -> dict:
    """{layer: {split_name: n x d float32}} for one subject's images through one backbone.

    Layers wider than pca_components are reduced by a PCA fitted on the train split only. Results are
    cached under out_dir/features/subjXX/<backbone tag>/ keyed by layer, image size, PCA size and the
    split's image indices; missing layers are extracted together in as few passes as memory allows.
    """
    import models
    layers = list(layers)
    cache_dir = Path(out_dir) / "features" / utils.subject_dir_name(subject) / backbone_spec_tag(spec)
    train_hash = _indices_hash(split["train"])

    def file_of(layer, split_name):
        split_hash = _indices_hash(split[split_name])
        return cache_dir / f"{layer}_{image_size}px_pca{pca_components}-{train_hash}_{split_name}-{split_hash}.npy"

    def pca_file(layer):
        return cache_dir / f"{layer}_{image_size}px_pca{pca_components}-{train_hash}_pca.npz"

    out = {layer: {} for layer in layers}
    missing = [(layer, s) for layer in layers for s in split_names if not file_of(layer, s).is_file()]
    for layer, s in [(layer, s) for layer in layers for s in split_names if (layer, s) not in missing]:
        out[layer][s] = np.load(file_of(layer, s))
    if not missing:
        return out

    # A wide layer's PCA is fitted on its train features: extract those too where not cached yet.
    missing += [(layer, "train") for layer in {layer for layer, _ in missing}
                if (layer, "train") not in missing and not file_of(layer, "train").is_file()]
    backbone = load_backbone(spec, device)
    for split_name in ["train"] + sorted({s for _, s in missing} - {"train"}):
        todo = [layer for layer, s in missing if s == split_name]
        if not todo:
            continue
        idx = split[split_name]
        for group in _layer_groups(backbone, todo, image_cache, idx, memory_gb, device):
            raw = models.extract_features(backbone, image_cache, idx, group, batch_size=batch_size, device=device,
                                          desc=f"{utils.subject_dir_name(subject)} {split_name} features")
            for layer in group:
                feats = raw.pop(layer)
                if feats.shape[1] > pca_components:
                    if split_name == "train":
                        pca = fit_pca(feats, pca_components, seed)
                        utils.save_npz(pca_file(layer), {"mean": pca.mean_.astype(np.float32),
                                                         "components": pca.components_.astype(np.float32)},
                                       {"layer": layer, "pca_components": pca_components, "seed": seed},
                                       backbone=spec, subject=subject)
                    pca = np.load(pca_file(layer))
                    feats = (feats - pca["mean"]) @ pca["components"].T
                feats = np.ascontiguousarray(feats, dtype=np.float32)
                utils.save_npy(file_of(layer, split_name), feats)
                if split_name in split_names:
                    out[layer][split_name] = feats
    return out


def _layer_groups(backbone, layers, image_cache, indices, memory_gb: float, device):
    """Split layers into groups whose raw features fit in memory_gb (one pass over the images per group)."""
    import models
    dims = models.feature_dims(backbone, layers, image_cache.shape[-1])
    groups, current, used = [], [], 0.0
    for layer in layers:
        need = len(indices) * dims[layer] * 4 / 2**30
        if current and used + need > memory_gb:
            groups.append(current)
            current, used = [], 0.0
        current.append(layer)
        used += need
    return groups + ([current] if current else [])


# ---- Encoding models of AlexNet features, best layer ----

def holdout_split(indices, fraction: float, seed: int):
    """Split indices into (fit, hold-out) with a seeded permutation; hold-out gets `fraction` of them."""
    indices = np.asarray(indices)
    order = np.random.default_rng(seed).permutation(len(indices))
    n_hold = max(1, int(round(fraction * len(indices))))
    return np.sort(indices[order[n_hold:]]), np.sort(indices[order[:n_hold]])


def unit_scale(features: dict) -> dict:
    """Features of every split divided by one scalar so train features have mean variance 1.

    Keeps PCA's variance ordering while putting every layer and backbone on the scale the per-voxel
    alpha grid is written for (eigenvalues of X^T X around n_train).
    """
    scale = float(np.sqrt(np.mean(np.var(features["train"], axis=0, dtype=np.float64))))
    scale = scale if scale > 0 else 1.0
    return {name: (x / scale).astype(np.float32) for name, x in features.items()}


def layer_roi_scores(features: dict, fmri: np.ndarray, split: dict, roi_indices: dict, alphas,
                     alpha_holdout: float = 0.1, seed: int = 0, device=None) -> np.ndarray:
    """Layers x ROIs median val Pearson r of whole-hemisphere ridge models (NaN for empty ROIs).

    Each voxel's alpha is chosen on a hold-out of the train split, so the val split only scores.
    """
    fit_rows, hold_rows = holdout_split(np.arange(len(split["train"])), alpha_holdout, seed)
    y_train = fmri[split["train"]]
    y_val = fmri[split["val"]]
    scores = np.full((len(features), len(roi_indices)), np.nan)
    for i, layer in enumerate(tqdm(features, desc="ridge per layer", unit="layer")):
        scaled = unit_scale(features[layer])
        x_train, x_val = scaled["train"], scaled["val"]
        model = fit_ridge(x_train[fit_rows], y_train[fit_rows], x_train[hold_rows], y_train[hold_rows],
                          alphas=alphas, device=device)
        r = pearson_r(y_val, model.predict(x_val))
        for j, idx in enumerate(roi_indices.values()):
            if len(idx):
                scores[i, j] = np.nanmedian(r[idx])
    return scores


def best_layer_per_roi(scores: np.ndarray, layers, roi_indices: dict) -> dict:
    """ROI -> layer with the highest median r (empty ROIs left out)."""
    return {roi: layers[int(np.nanargmax(scores[:, j]))]
            for j, (roi, idx) in enumerate(roi_indices.items()) if len(idx) and np.isfinite(scores[:, j]).any()}


def load_best_layers(out_dir, subject: int, hemi: str) -> dict:
    """The ROI -> layer choice written by get_best_alex_layer.py (one-line error when it has not run)."""
    import json
    path = Path(out_dir) / "best_layer" / utils.subject_dir_name(subject) / f"{hemi}_best_layer.json"
    if not path.is_file():
        raise utils.DataError(f"{path}: not found; run get_best_alex_layer.py for subject {subject} first")
    return json.loads(path.read_text())


def encode_test(features: dict, fmri: np.ndarray, split: dict, voxel_indices, alphas, device=None):
    """Fit ridge on train (per-voxel alpha chosen on val, or one fixed alpha) and predict the test split.

    Returns (test predictions n_test x v, test r per voxel) for the given voxels. A grid of alphas works
    on unit_scale()d features; one fixed alpha (the paper's mode) on the features as they are.
    """
    if np.ndim(alphas) and len(alphas) > 1:
        features = unit_scale(features)
    y = fmri[:, voxel_indices]
    model = fit_ridge(features["train"], y[split["train"]], features["val"], y[split["val"]],
                      alphas=alphas, device=device)
    prediction = model.predict(features["test"])
    return prediction, pearson_r(y[split["test"]], prediction)


def format_table(rows: list[dict], columns, float_format: str = "{:.3f}") -> str:
    """Fixed-width text table of selected columns."""
    def cell(v):
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else float_format.format(v)
        return str(v)
    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(str(c))] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns, float_format: str = "{:.3f}") -> str:
    """GitHub Markdown table of selected columns."""
    def cell(v):
        if isinstance(v, float):
            if not np.isfinite(v):
                return "–"
            return f"{v:.1e}" if 0 < abs(v) < 1e-3 else float_format.format(v)  # small p-values stay readable
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- Figures ----

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


# ---- Result types: single-subject, cross-subject, classification linear probes ----

class EncodingStudy:
    """Loads each subject once and memoises the encoding fits that several result types share."""

    def __init__(self, options: dict, device):
        self.o = options
        self.device = device
        self._subjects: dict = {}
        self._untuned: dict = {}
        self._tuned: dict = {}
        self.checkpoints_used: set = set()

    def provenance(self) -> dict:
        """What results so far came from: the split files and the model checkpoints (for sidecars)."""
        return {"split_files": [str(utils.split_path(self.o["out_dir"], s)) for s in sorted(self._subjects)],
                "checkpoints": sorted(self.checkpoints_used)}

    def alphas(self, tuned: bool):
        """Per-voxel grid, or the paper's fixed alpha (untuned 1e3, tuned 1e4) in paper mode."""
        if self.o["alpha_mode"] == "paper":
            return [PAPER_ALPHA_TUNED if tuned else PAPER_ALPHA_UNTUNED]
        return self.o["alphas"]

    def subject(self, subject: int) -> dict:
        if subject not in self._subjects:
            paths = utils.find_subject(self.o["data_dir"], subject)
            info = utils.validate_subject(paths)
            split = utils.get_split(self.o["out_dir"], subject, info["images"], seed=self.o["split_seed"])
            data = {"paths": paths, "info": info, "split": split, "fmri": {}, "rois": {}, "ceiling": {},
                    "images": utils.load_image_cache(self.o["out_dir"], subject, info["images"],
                                                     size=self.o["image_size"])}
            for hemi in self.o["hemispheres"]:
                data["fmri"][hemi] = np.asarray(utils.load_fmri(paths, hemi))
                data["rois"][hemi] = utils.roi_voxel_indices(paths, hemi, info["n_vertices"][hemi])
                data["ceiling"][hemi] = utils.load_noise_ceiling(paths, hemi)
            self._subjects[subject] = data
        return self._subjects[subject]

    def features(self, subject: int, spec: str, layers, splits=("train", "val", "test")) -> dict:
        d = self.subject(subject)
        return layer_features(self.o["out_dir"], subject, spec, layers, d["images"], d["split"], splits,
                              self.o["image_size"], self.o["pca_components"], self.o["seed"], self.device,
                              self.o["batch_size"], self.o["feature_memory_gb"])

    def untuned(self, subject: int, hemi: str, roi: str):
        """(test predictions, test r) of the ROI's voxels from the untuned best-layer model."""
        best = load_best_layers(self.o["out_dir"], subject, hemi)
        if roi not in best:
            return None
        layer = best[roi]
        key = (subject, hemi, layer)
        if key not in self._untuned:
            d = self.subject(subject)
            feats = self.features(subject, f"untuned:{self.o['weights']}", [layer])[layer]
            all_voxels = np.arange(d["fmri"][hemi].shape[1])
            self._untuned[key] = encode_test(feats, d["fmri"][hemi], d["split"], all_voxels, self.alphas(False),
                                             self.device)
        prediction, r = self._untuned[key]
        idx = self.subject(subject)["rois"][hemi][roi]
        return prediction[:, idx], r[idx]

    def tuned(self, method: str, source: int, target: int, hemi: str, roi: str):
        """(test predictions, test r) of target's ROI voxels from source's tuned backbone, or None if absent."""
        import models
        key = (method, source, target, hemi, roi)
        if key not in self._tuned:
            ckpt = models.checkpoint_path(self.o["out_dir"], method, source, hemi, roi, self.o["checkpoint"])
            d = self.subject(target)
            idx = d["rois"][hemi].get(roi, np.array([], dtype=np.int64))
            if not ckpt.is_file() or not len(idx):
                self._tuned[key] = None
            else:
                layer = self.o["tuned_layer"]
                self.checkpoints_used.add(str(ckpt))
                feats = self.features(target, str(ckpt), [layer])[layer]
                self._tuned[key] = encode_test(feats, d["fmri"][hemi], d["split"], idx, self.alphas(True),
                                               self.device)
        return self._tuned[key]

    def test_truth(self, subject: int, hemi: str, roi: str) -> np.ndarray:
        d = self.subject(subject)
        return d["fmri"][hemi][d["split"]["test"]][:, d["rois"][hemi][roi]]


SINGLE_SUBJ_COLUMNS = ["roi", "group", "n_voxels", "untuned_layer", "median_r_untuned", "median_r_reg", "median_r_cl",
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
    best = load_best_layers(study.o["out_dir"], subject, hemi)
    for roi in rois:
        idx = d["rois"][hemi][roi]
        row = {"subject": subject, "hemisphere": hemi, "roi": roi, "group": _group_of(roi), "n_voxels": len(idx),
               "untuned_layer": best.get(roi, "")}
        if not len(idx):
            rows.append({**row, "note": "empty ROI"})
            continue
        fits = {"untuned": study.untuned(subject, hemi, roi),
                "reg": study.tuned("reg", subject, subject, hemi, roi),
                "cl": study.tuned("cl", subject, subject, hemi, roi)}
        for m in (m for m, fit in fits.items() if fit is None):
            missing.setdefault(m, []).append(roi)
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
        ceiling = d["ceiling"].get(hemi)
        if ceiling is not None:
            for m in (m for m, fit in fits.items() if fit is not None):
                row[f"median_noise_normalized_{m}"] = float(np.nanmedian(noise_normalized(r[m], ceiling[idx])))
        truth = study.test_truth(subject, hemi, roi)
        for other in ("untuned", "reg"):
            if fits["cl"] is not None and fits[other] is not None:
                row[f"wilcoxon_p_cl_vs_{other}"] = paired_wilcoxon(r["cl"], r[other])["pvalue"]
                boot = bootstrap_median_r_diff(truth, fits["cl"][0], fits[other][0], n_bootstrap, seed)
                row[f"median_diff_cl_vs_{other}"] = boot["observed"]
                row[f"ci95_median_diff_cl_vs_{other}"] = f"[{boot['ci_low']:.3f}, {boot['ci_high']:.3f}]"
        rows.append(row)
    return rows, voxel_r, missing


def _group_of(roi: str) -> str:
    return next((g for g, members in utils.ROI_GROUPS.items() if roi in members), "")


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
        base = study.untuned(target, hemi, roi) if len(study.subject(target)["rois"][hemi][roi]) else None
        for i, source in enumerate(subjects):
            res = study.tuned(method, source, target, hemi, roi)
            if res is None:
                continue
            median_r[i, j] = np.nanmedian(res[1])
            if base is not None:
                improved[i, j] = percent_improved(res[1], base[1])
    return median_r, improved


def load_classification_images(dataset: str, root, image_size: int, max_per_class: int, seed: int = 0):
    """(uint8 N x 3 x S x S images, int labels, class names) from an ImageFolder or a torchvision dataset.

    dataset: 'imagefolder' (root = folder of class subfolders), or 'caltech256', 'places365', 'sun397',
    'imagenet' read from root with download=False (they must be present locally).
    """
    import torchvision.datasets as tvd
    root = Path(root)
    if not root.exists():
        raise utils.DataError(f"{root}: classification dataset folder not found")
    makers = {
        "imagefolder": lambda: tvd.ImageFolder(root),
        "caltech256": lambda: tvd.Caltech256(root, download=False),
        "places365": lambda: tvd.Places365(root, split="val", small=True, download=False),
        "sun397": lambda: tvd.SUN397(root, download=False),
        "imagenet": lambda: tvd.ImageNet(root, split="val"),
    }
    if dataset not in makers:
        raise utils.OptionsError(f"--classification_dataset={dataset}: expected one of {', '.join(makers)}")
    try:
        ds = makers[dataset]()
    except (RuntimeError, FileNotFoundError) as err:
        raise utils.DataError(f"{root}: cannot read {dataset} ({err})") from None
    targets = np.asarray(next(getattr(ds, a) for a in ("targets", "y", "_labels") if hasattr(ds, a)))
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:max_per_class]
                                     for c in np.unique(targets)]))
    images = np.empty((len(chosen), 3, image_size, image_size), dtype=np.uint8)
    for k, i in enumerate(tqdm(chosen, desc=f"decoding {dataset} images", unit="img")):
        pil, _ = ds[int(i)]
        images[k] = np.asarray(pil.convert("RGB").resize((image_size, image_size)), dtype=np.uint8).transpose(2, 0, 1)
    classes = list(getattr(ds, "classes", [str(c) for c in np.unique(targets)]))
    return images, targets[chosen], classes


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.15,
                          seed: int = 0) -> float:
    """Test accuracy of StandardScaler + LogisticRegression on a seeded stratified split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_fraction,
                                                        random_state=seed, stratify=labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


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
