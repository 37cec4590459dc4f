"""PCA fitted on the train split only (an exact or randomized eigendecomposition of the smaller Gram matrix on the
CPU, torch's randomized PCA on a GPU).

Depends on nothing else in this repo. A fitted PCA is saved as plain arrays (pca_arrays), never pickled.
"""
from __future__ import annotations

import numpy as np


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _device(device):
    """A torch device: None / 'auto' = cuda when present, else cpu."""
    import torch
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit(X_train, n_components: int = 1000, seed: int = 0, device=None):
    """PCA fitted on the train rows only; use its .transform on every split (fit_transform: with the train scores).

    CPU: from the smaller Gram matrix (images x images for a wide layer, features x features otherwise): exact
    eigendecomposition when the components are most of it, else randomized subspace iterations on it. On the 2-core
    CPU a 7,369 x 64,896 layer took 34 s this way against 85 s by scikit-learn's randomized PCA (whose power
    iterations pass over the wide matrix ten times; this reads it twice). CUDA device: TorchPCA (randomized).
    n_components is capped at min(n_images - 1, n_features), the centred train rank: a component beyond it has zero
    train variance yet would move val/test predictions.
    """
    return fit_transform(X_train, n_components, seed, device, scores=False)[0]


def fit_transform(X_train, n_components: int = 1000, seed: int = 0, device=None, scores: bool = True,
                  overwrite_x: bool = False):
    """(fitted PCA, train scores = its transform of X_train, or None when not scores). overwrite_x: X_train (a
    float numpy array) may be centred in place, saving a copy of it."""
    X_train = X_train if _is_torch(X_train) else np.asarray(X_train)
    if X_train.ndim != 2 or X_train.shape[0] < 2:
        raise ValueError(f"PCA input of shape {tuple(X_train.shape)}: expected images x features with >= 2 images")
    n_components = int(min(n_components, X_train.shape[0] - 1, X_train.shape[1]))
    if device is not None and _device(device).type == "cuda":
        fitted = TorchPCA(n_components, seed, device).fit(X_train)
        return fitted, fitted.transform(X_train) if scores else None
    return _gram_pca(X_train, n_components, seed, scores, overwrite_x)


EXACT_FRACTION = 0.3    # components above this fraction of the Gram matrix's size: its exact eigendecomposition
EXACT_BELOW = 500       # ... and for a Gram matrix of at most this size
POWER_ITERATIONS = 4    # randomized path: subspace iterations on the Gram matrix (each like two on the data)


def _gram_pca(X, n_components: int, seed: int = 0, scores: bool = True, overwrite_x: bool = False):
    """PCA from the eigendecomposition of the smaller Gram matrix of the centred data, as scikit-learn's PCA object
    (its sign convention; directions of (numerically) zero variance left out), and the train scores."""
    n, p = X.shape
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float32
    mean = X.mean(0, dtype=np.float64)
    if overwrite_x and X.dtype == dtype and X.flags.writeable and not isinstance(X, np.memmap):
        X -= mean.astype(dtype)                                   # centred in place: no second copy
        Xc = X
    else:
        Xc = np.asarray(X, dtype=dtype) - mean.astype(dtype)
    wide = n <= p
    gram = Xc @ Xc.T if wide else Xc.T @ Xc                        # numpy: BLAS syrk (half the products)
    eigenvalues, vectors = _top_eigenpairs(gram, n_components, seed)
    s = np.sqrt(np.clip(eigenvalues, 0, None))
    keep = s > s[0] * max(n, p) * np.finfo(dtype).eps
    eigenvalues, vectors, s = eigenvalues[keep], vectors[:, keep], s[keep]
    if wide:  # vectors: left singular vectors U; components V^T = U^T Xc / s
        components = (vectors.T.astype(dtype) @ Xc) / s[:, None].astype(dtype)
    else:     # vectors: the components themselves
        components = np.ascontiguousarray(vectors.T, dtype=dtype)
    signs = np.sign(components[np.arange(len(s)), np.abs(components).argmax(1)]).astype(dtype)  # sklearn svd_flip
    components *= signs[:, None]
    train_scores = None
    if scores:  # = Xc @ components.T; for a wide layer from the Gram matrix (images x images), not the data
        train_scores = ((gram @ vectors.astype(dtype)) * (signs / s.astype(dtype))) if wide else Xc @ components.T
    fitted = from_arrays({"mean": mean.astype(dtype), "components": components,
                          "explained_variance": (eigenvalues / (n - 1)).astype(dtype)})
    return fitted, train_scores


def _top_eigenpairs(gram, k: int, seed: int):
    """The k largest eigenvalues (descending, float64) and eigenvectors of a symmetric PSD matrix: exact when k is a
    large fraction of its size, else by randomized subspace iterations (Halko et al.) and Rayleigh-Ritz.

    QR and eigh run in torch on one thread: on the 2-core EPYC LAPACK's QR through numpy/scipy took 8-14 s for a
    7,369 x 1,100 matrix, torch's 0.5 s (two threads stalled it, as encoding._one_cpu_thread says).
    """
    m = gram.shape[0]
    if k > EXACT_FRACTION * m or m <= EXACT_BELOW:
        values, vectors = _one_thread(torch_eigh, gram.astype(np.float64))
        return values[::-1][:k], vectors[:, ::-1][:, :k]
    width = min(m, k + max(10, k // 10))
    Q = gram @ np.random.default_rng(seed).standard_normal((m, width)).astype(gram.dtype)
    for _ in range(POWER_ITERATIONS):
        Q = gram @ _one_thread(torch_qr, Q)
    Q = _one_thread(torch_qr, Q)
    small = (Q.T @ (gram @ Q)).astype(np.float64)
    values, W = _one_thread(torch_eigh, (small + small.T) / 2)
    order = np.argsort(values)[::-1][:k]
    return values[order], Q @ W[:, order].astype(Q.dtype)


def torch_qr(a: np.ndarray) -> np.ndarray:
    import torch
    return torch.linalg.qr(torch.from_numpy(a)).Q.numpy()


def torch_eigh(a: np.ndarray):
    import torch
    values, vectors = torch.linalg.eigh(torch.from_numpy(a))
    return values.numpy(), vectors.numpy()


def _one_thread(function, *args):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def arrays(pca) -> dict:
    """A fitted PCA's parameters as plain arrays (to save with numpy, never pickled)."""
    return {"mean": np.asarray(pca.mean_, dtype=np.float32), "components": np.asarray(pca.components_, np.float32),
            "explained_variance": np.asarray(pca.explained_variance_, dtype=np.float32)}


def from_arrays(arrays):
    """scikit-learn's PCA restored from arrays(): its own transform, (X - mean) @ components.T."""
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
