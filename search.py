"""The layer search: per ROI, the layer of a feature set whose ridge model predicts the val split best.

Every feature set gets the same search: each layer's features (PCA-reduced on train when wide, unit-scaled),
ridge fitted on train with one alpha per voxel, and the choice made on the val split by cross-fitting: the val
images are cut into two seeded halves; each voxel's alpha is chosen on one half and scored on the other, both
ways, and the two scores averaged. No choice is made on images a tuned backbone was fine-tuned on (the train split),
so tuned and untuned sets are chosen alike. A search is saved with a key of every option that changes its result;
a saved search is reused only when its key matches.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

import encoding
import options
import outputs

SEARCH_FORMAT = "layer_search_v2"
STATISTICS = ("median", "mean")
SELECTION = "val-halves-crossfit"   # how alphas and layers are chosen (recorded in every search key)


def val_halves(n_val: int, seed: int = 0) -> np.ndarray:
    """A fold label (0 or 1) per val image: a seeded permutation cut into two halves."""
    labels = np.arange(n_val) % 2
    return np.random.default_rng([seed, 7]).permutation(labels)


def crossfit_r(fold_scores: np.ndarray) -> np.ndarray:
    """Per voxel: r on each half at the alpha chosen on the other half, averaged (fold_scores: 2 x alphas x V)."""
    ranked = np.nan_to_num(fold_scores, nan=-np.inf)
    v = np.arange(fold_scores.shape[2])
    out = []
    for chooser, scorer in ((0, 1), (1, 0)):
        finite = np.isfinite(ranked[chooser]).any(0)
        pick = np.where(finite, ranked[chooser].argmax(0), fold_scores.shape[1] - 1)  # no score: most shrinkage
        out.append(fold_scores[scorer][pick, v])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a voxel with NaN on both halves stays NaN
        return np.nanmean(np.stack(out), axis=0)


def scaled(features: dict, scaling: str, n_alphas: int) -> dict:
    """Features as the ridge reads them: 'unit' (train mean variance 1), 'none', or 'auto' (unit for an alpha grid,
    as they are for one fixed alpha, the paper's mode)."""
    if scaling == "unit" or (scaling == "auto" and n_alphas > 1):
        return encoding.unit_scale(features)
    return features


def layer_roi_scores(layer_features: dict, fmri: np.ndarray, split: dict, roi_indices: dict, alphas,
                     seed: int = 0, device=None, statistic: str = "median", feature_scaling: str = "auto",
                     desc: str = "ridge per layer") -> np.ndarray:
    """Layers x ROIs: the median (or mean) over each ROI's voxels of the cross-fitted val r (NaN for empty ROIs).

    layer_features: {layer: {'train', 'val': images x features}}; fmri: images x voxels, of which only those the
    ROIs point into are fitted.
    """
    summarize = {"median": np.nanmedian, "mean": np.nanmean}[statistic]
    voxels = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in roi_indices.values()] + [[]]))
    voxels = voxels.astype(np.int64)    # sorted: an ROI's columns among them by searchsorted
    y = np.asarray(fmri[:, voxels]) if len(voxels) else None
    halves = val_halves(len(split["val"]), seed)
    scores = np.full((len(layer_features), len(roi_indices)), np.nan)
    for i, layer in enumerate(tqdm(layer_features, desc=desc, unit="layer", leave=False)):
        if y is None:
            break
        x = scaled(layer_features[layer], feature_scaling, len(alphas))
        fit = encoding.fit_ridge(x["train"], y[split["train"]], x["val"], y[split["val"]], alphas=alphas,
                                 compute_coef=False, device=device, val_folds=halves)
        r = crossfit_r(fit.val_fold_scores_)
        for j, idx in enumerate(roi_indices.values()):
            if len(idx):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    scores[i, j] = summarize(r[np.searchsorted(voxels, idx)])
    return scores


def file_identity(path) -> str:
    """A file's size and a hash of its first and last MiB: tells a retrained or replaced file from the old one,
    and survives copying (unlike a modification time)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(size - (1 << 20))
            digest.update(fh.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def split_identity(split: dict) -> str:
    """A hash of a subject's train/val/test row indices."""
    digest = hashlib.sha1()
    for name in ("train", "val", "test"):
        digest.update(np.ascontiguousarray(split[name], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def search_result(scores: np.ndarray, layers, roi_indices: dict, statistic: str) -> dict:
    """{roi: {'layer': best layer, 'scores': {layer: val r}, 'n_voxels'}} (empty ROIs: layer None)."""
    rois = {}
    for j, (roi, idx) in enumerate(roi_indices.items()):
        column = scores[:, j]
        best = layers[int(np.nanargmax(column))] if len(idx) and np.isfinite(column).any() else None
        rois[roi] = {"layer": best, "n_voxels": int(len(idx)),
                     "scores": {layer: (float(v) if np.isfinite(v) else None) for layer, v in zip(layers, column)}}
    return {"format": SEARCH_FORMAT, "statistic": statistic, "layers": list(layers), "rois": rois}


def write_search(path, result: dict, key: dict, seconds: float, script_options: dict, **extra) -> Path:
    return outputs.save_json(path, {**result, "key": key, "search_seconds": round(seconds, 2), **extra},
                             script_options)


def saved_key(path) -> dict | None:
    """The key of a saved search, or None when there is none (or it is unreadable: it will be redone)."""
    try:
        return json.loads(Path(path).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def read_search(path, key: dict, command: str) -> dict:
    """A saved search made with exactly these options (key), or one line naming the command that makes it."""
    path = Path(path)
    if not path.is_file():
        raise options.DataError(f"{path}: no layer search; run {command}")
    try:
        saved = json.loads(path.read_text())
        saved_key_ = saved["key"]
    except (ValueError, KeyError, TypeError) as err:
        raise options.DataError(f"{path}: unreadable layer search ({type(err).__name__}: {err}); delete it and "
                                f"run {command}") from None
    changed = [f"{k}: {saved_key_.get(k)!r} -> {v!r}" for k, v in key.items() if saved_key_.get(k) != v]
    if changed:
        shown = "; ".join(c if len(c) < 120 else c[:117] + "..." for c in changed[:3])
        raise options.DataError(f"{path}: made with other options ({shown}); run {command} (it searches again)")
    return saved
