"""PCA fitted on the train split only (scikit-learn's, an exact Gram-matrix PCA for wide layers, or torch on GPU).

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
    """PCA fitted on the train rows only; use its .transform on every split.

    CPU: scikit-learn's randomized PCA (a torch port measured 1.7x slower on the 2-core CPU); when the components
    are most of min(n_images, n_features), the exact PCA from the images' Gram matrix (few images, wide layers: a
    375 x 14,400 layer took 0.4 s this way, 13 s by LAPACK's SVD and 14 s randomized, on the 2-core CPU).
    CUDA device: TorchPCA (randomized, on the GPU). n_components is capped at min(n_images - 1, n_features), the
    centred train rank: a component beyond it has zero train variance yet would move val/test predictions.
    """
    X_train = X_train if _is_torch(X_train) else np.asarray(X_train)
    if X_train.ndim != 2 or X_train.shape[0] < 2:
        raise ValueError(f"PCA input of shape {tuple(X_train.shape)}: expected images x features with >= 2 images")
    n_components = int(min(n_components, X_train.shape[0] - 1, X_train.shape[1]))
    if device is not None and _device(device).type == "cuda":
        return TorchPCA(n_components, seed, device).fit(X_train)
    if n_components > 0.5 * min(X_train.shape) and X_train.shape[0] <= X_train.shape[1]:
        return _gram_pca(np.asarray(X_train), n_components)
    from sklearn.decomposition import PCA
    return PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(X_train)


def _gram_pca(X, n_components: int):
    """Exact PCA of a wide matrix (images <= features) from the eigendecomposition of its n x n Gram matrix, as
    scikit-learn's PCA object (its sign convention; directions of (numerically) zero variance left out)."""
    mean = X.mean(0, dtype=np.float64)
    Xc = X - mean
    eigenvalues, U = np.linalg.eigh((Xc @ Xc.T).astype(np.float64))
    order = np.argsort(eigenvalues)[::-1][:n_components]
    s = np.sqrt(np.clip(eigenvalues[order], 0, None))
    keep = s > s[0] * max(X.shape) * np.finfo(X.dtype).eps
    s, U = s[keep], U[:, order[keep]]
    components = (U.T @ Xc) / s[:, None]
    signs = np.sign(components[np.arange(len(s)), np.abs(components).argmax(1)])  # sklearn's svd_flip (v-based)
    return from_arrays({"mean": mean.astype(X.dtype), "components": (components * signs[:, None]).astype(X.dtype),
                            "explained_variance": (s ** 2 / (len(X) - 1)).astype(X.dtype)})


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
