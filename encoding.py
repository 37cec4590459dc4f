"""Encoding core: Pearson r, PCA fitted on train, ridge with one alpha per voxel, the Algonauts challenge score.

Depends on nothing else in this repo (numpy, torch, scikit-learn only). Conventions:
- arrays are images x voxels (rows = stimuli, columns = voxels/vertices), features images x features;
- a per-voxel score that cannot be computed (constant column, empty set) is NaN, never a silent 0;
- ridge runs in torch (GPU when present), big matmuls in float32, the small decompositions in float64;
- bad arrays raise ValueError (the scripts validate user data before it reaches this module).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

#
# Conventions of this section:
# - arrays are images x voxels (rows = stimuli, columns = voxels/vertices), features images x features;
# - a per-voxel score that cannot be computed (constant column, empty set) is NaN, never a silent 0,
#   and summaries count the NaNs and leave them out;
# - ridge runs in torch (GPU when present), big matmuls in float32, the small decompositions in float64.

# Fixed alphas of the paper's seed-compatible mode.
PAPER_ALPHA_UNTUNED = 1e3   # untuned (ImageNet) features reduced to PCA(1000)
PAPER_ALPHA_TUNED = 1e4     # fine-tuned model, classifier.6 features
# The one alpha grid of the project (scripts' `alphas = []` mean this). alpha competes with the eigenvalues
# of the centred train Gram matrix X^T X (n_train x the feature variance along each principal axis): ~7.4e3
# on average for unit-scaled features (encoding.unit_scale) and ~7,400 train images. One alpha per decade
# from 1e1 (nearly OLS for such features) to 1e7 (nearly all shrunk to the intercept: right for voxels
# without signal) brackets the paper's fixed 1e3 and 1e4 by 2-3 decades either side;
# RidgeFit.alpha_summary() says how many voxels sit at an edge (then widen it).
ALPHAS = tuple(10.0 ** k for k in range(1, 8))


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


# -- Encoding core: PCA (fit on train only) --


def fit_pca(X_train, n_components: int = 1000, seed: int = 0, device=None):
    """PCA fitted on the train rows only; use its .transform on every split.

    CPU: scikit-learn's randomized PCA (a torch port measured 1.7x slower on the 2-core CPU). CUDA device:
    TorchPCA, the same randomized algorithm on the GPU. n_components is capped at min(n_images, n_features)
    (beyond that PCA is a rotation and changes no ridge prediction).
    """
    X_train = X_train if _is_torch(X_train) else np.asarray(X_train)
    if X_train.ndim != 2 or X_train.shape[0] < 2:
        raise ValueError(f"PCA input of shape {tuple(X_train.shape)}: expected images x features with >= 2 images")
    n_components = int(min(n_components, *X_train.shape))
    if device is not None and _device(device).type == "cuda":
        return TorchPCA(n_components, seed, device).fit(X_train)
    from sklearn.decomposition import PCA
    return PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(X_train)


def pca_arrays(pca) -> dict:
    """A fitted PCA's parameters as plain arrays (to save with numpy, never pickled)."""
    return {"mean": np.asarray(pca.mean_, dtype=np.float32), "components": np.asarray(pca.components_, np.float32),
            "explained_variance": np.asarray(pca.explained_variance_, dtype=np.float32)}


def pca_from_arrays(arrays):
    """scikit-learn's PCA restored from pca_arrays(): its own transform, (X - mean) @ components.T."""
    from sklearn.decomposition import PCA
    components = np.asarray(arrays["components"])
    pca = PCA(n_components=components.shape[0])
    pca.mean_, pca.components_ = np.asarray(arrays["mean"]), components
    pca.explained_variance_ = np.asarray(arrays["explained_variance"])
    pca.n_components_, pca.n_features_in_ = components.shape
    return pca


class TorchPCA:
    """Randomized PCA in torch (Halko et al.: range finder with power iterations, as sklearn's), for the GPU.

    Fitted attributes mirror sklearn's PCA: mean_, components_ (k x d), explained_variance_; transform(X).
    """

    def __init__(self, n_components: int, seed: int = 0, device="cuda", n_oversamples: int = 10, n_iter: int = 7):
        self.n_components, self.seed, self.device = n_components, seed, _device(device)
        self.n_oversamples, self.n_iter = n_oversamples, n_iter

    def fit(self, X):
        import torch
        X = torch.as_tensor(np.asarray(X, dtype=np.float32) if not _is_torch(X) else X, device=self.device).float()
        mean = X.mean(0)
        Xc = X - mean
        k = min(self.n_components + self.n_oversamples, *Xc.shape)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        Q = torch.randn(Xc.shape[1], k, device=self.device, generator=generator)
        for _ in range(self.n_iter):  # power iterations, re-orthonormalised (LU in sklearn, QR here)
            Q = torch.linalg.qr(Xc @ Q).Q
            Q = torch.linalg.qr(Xc.T @ Q).Q
        Q = torch.linalg.qr(Xc @ Q).Q
        _, S, Vt = torch.linalg.svd(Q.T @ Xc, full_matrices=False)
        # sklearn's sign convention (svd_flip, v-based): the largest |entry| of each component is positive
        signs = torch.sign(Vt.gather(1, Vt.abs().argmax(1, keepdim=True)))[:, 0]
        Vt = Vt * signs[:, None]
        self.mean_ = mean.cpu().numpy()
        self.components_ = Vt[:self.n_components].cpu().numpy()
        self.explained_variance_ = (S[:self.n_components] ** 2 / (X.shape[0] - 1)).cpu().numpy()
        self.n_components_ = self.components_.shape[0]
        return self

    def transform(self, X) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float32) - self.mean_) @ self.components_.T).astype(np.float32)


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
            raise ValueError(f"features of shape {X.shape}: expected images x {self.coef_.shape[0]} features")
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


def fit_ridge(X_train, Y_train, X_val=None, Y_val=None, alphas=ALPHAS, *, voxel_alphas=None,
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
    dev = _device(device)
    work = {"float32": torch.float32, "float64": torch.float64}[dtype]
    f64 = torch.float64

    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=dev)
    if not torch.isfinite(Xt).all():
        raise ValueError("X_train: non-finite feature values (NaN or inf)")
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
            raise ValueError(f"validation split of shapes X {Xv.shape}, Y {Yv_all.shape}: expected "
                                  f"images x {p} features and images x {v} voxels with the same rows")
        Xv_t = torch.as_tensor(np.asarray(Xv, dtype=np.float64), device=dev)
        if not torch.isfinite(Xv_t).all():
            raise ValueError("X_val: non-finite feature values (NaN or inf)")
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
            raise ValueError(f"Y_train: non-finite responses (NaN or inf) in voxels {cols.start}..{cols.stop - 1}")
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


def _device(device):
    """A torch device: None / 'auto' = cuda when present, else cpu."""
    import torch
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- Encoding core: feature scaling, hold-outs and synthetic data for tests and benchmarks --


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

