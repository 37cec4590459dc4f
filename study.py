"""The encoding study: each subject loaded once, layer search on the val split, test-split fits of every feature set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

import encoding
import features
import models
import utils


def layer_roi_scores(layer_features: dict, fmri: np.ndarray, split: dict, roi_indices: dict, alphas,
                     alpha_holdout: float = 0.1, seed: int = 0, device=None) -> np.ndarray:
    """Layers x ROIs median val Pearson r of whole-hemisphere ridge models (NaN for empty ROIs).

    Each voxel's alpha is chosen on a hold-out of the train split, so the val split only scores.
    """
    fit_rows, hold_rows = encoding.holdout_split(np.arange(len(split["train"])), alpha_holdout, seed)
    y_train = fmri[split["train"]]
    y_val = fmri[split["val"]]
    scores = np.full((len(layer_features), len(roi_indices)), np.nan)
    for i, layer in enumerate(tqdm(layer_features, desc="ridge per layer", unit="layer")):
        scaled = encoding.unit_scale(layer_features[layer])
        x_train, x_val = scaled["train"], scaled["val"]
        model = encoding.fit_ridge(x_train[fit_rows], y_train[fit_rows], x_train[hold_rows], y_train[hold_rows],
                                   alphas=alphas, device=device)
        r = encoding.pearson_r(y_val, model.predict(x_val))
        for j, idx in enumerate(roi_indices.values()):
            if len(idx):
                scores[i, j] = np.nanmedian(r[idx])
    return scores


def best_layer_per_roi(scores: np.ndarray, layers, roi_indices: dict) -> dict:
    """ROI -> layer with the highest median r (empty ROIs left out)."""
    return {roi: layers[int(np.nanargmax(scores[:, j]))]
            for j, (roi, idx) in enumerate(roi_indices.items()) if len(idx) and np.isfinite(scores[:, j]).any()}


def best_layer_path(out_dir, subject: int, hemi: str) -> Path:
    return Path(out_dir) / "best_layer" / utils.subject_dir_name(subject) / f"{hemi}_best_layer.json"


def load_best_layers(out_dir, subject: int, hemi: str) -> dict:
    """The ROI -> layer choice written by get_best_alex_layer.py (one-line error when it has not run)."""
    path = best_layer_path(out_dir, subject, hemi)
    if not path.is_file():
        raise utils.DataError(f"{path}: not found; run get_best_alex_layer.py for subject {subject} first")
    return json.loads(path.read_text())


def encode_test(layer_features: dict, fmri: np.ndarray, split: dict, voxel_indices, alphas, device=None):
    """Fit ridge on train (per-voxel alpha chosen on val, or one fixed alpha) and predict the test split.

    Returns (test predictions n_test x v, test r per voxel) for the given voxels. A grid of alphas works
    on unit-scaled features; one fixed alpha (the paper's mode) on the features as they are.
    """
    if np.ndim(alphas) and len(alphas) > 1:
        layer_features = encoding.unit_scale(layer_features)
    y = fmri[:, voxel_indices]
    model = encoding.fit_ridge(layer_features["train"], y[split["train"]], layer_features["val"], y[split["val"]],
                               alphas=alphas, device=device)
    prediction = model.predict(layer_features["test"])
    return prediction, encoding.pearson_r(y[split["test"]], prediction)


class EncodingStudy:
    """Loads each subject once and memoises the encoding fits that several result types share."""

    def __init__(self, data_dir, out_dir, hemispheres, weights: str, image_size: int, split_seed: int,
                 pca_components: int, seed: int, batch_size: int, feature_memory_gb: float, alpha_mode: str,
                 alphas, tuned_layer: str, checkpoint: str, device):
        self.data_dir, self.out_dir, self.hemispheres = data_dir, out_dir, list(hemispheres)
        self.weights, self.image_size, self.split_seed = weights, image_size, split_seed
        self.pca_components, self.seed, self.batch_size = pca_components, seed, batch_size
        self.feature_memory_gb, self.alpha_mode, self.alpha_grid = feature_memory_gb, alpha_mode, alphas
        self.tuned_layer, self.checkpoint, self.device = tuned_layer, checkpoint, device
        self._subjects: dict = {}
        self._untuned: dict = {}
        self._tuned: dict = {}
        self.checkpoints_used: set = set()

    def provenance(self) -> dict:
        """What results so far came from: the split files and the model checkpoints (for sidecars)."""
        return {"split_files": [str(utils.split_path(self.out_dir, s)) for s in sorted(self._subjects)],
                "checkpoints": sorted(self.checkpoints_used)}

    def alphas(self, tuned: bool):
        """Per-voxel grid, or the paper's fixed alpha (untuned 1e3, tuned 1e4) in paper mode."""
        if self.alpha_mode == "paper":
            return [encoding.PAPER_ALPHA_TUNED if tuned else encoding.PAPER_ALPHA_UNTUNED]
        return self.alpha_grid

    def subject(self, subject: int) -> utils.Subject:
        if subject not in self._subjects:
            self._subjects[subject] = utils.load_subject(self.data_dir, subject, self.out_dir, self.image_size,
                                                         self.split_seed, self.hemispheres)
        return self._subjects[subject]

    def features(self, subject: int, spec: str, layers, splits=("train", "val", "test")) -> dict:
        d = self.subject(subject)
        return features.layer_features(self.out_dir, subject, spec, layers, d.images, d.split, splits,
                                       self.image_size, self.pca_components, self.seed, self.device,
                                       self.batch_size, self.feature_memory_gb)

    def untuned(self, subject: int, hemi: str, roi: str):
        """(test predictions, test r) of the ROI's voxels from the untuned best-layer model."""
        best = load_best_layers(self.out_dir, subject, hemi)
        if roi not in best:
            return None
        layer = best[roi]
        key = (subject, hemi, layer)
        d = self.subject(subject)
        if key not in self._untuned:
            feats = self.features(subject, f"untuned:{self.weights}", [layer])[layer]
            all_voxels = np.arange(d.fmri[hemi].shape[1])
            self._untuned[key] = encode_test(feats, d.fmri[hemi], d.split, all_voxels, self.alphas(False),
                                             self.device)
        prediction, r = self._untuned[key]
        idx = d.roi_voxel_indices[hemi][roi]
        return prediction[:, idx], r[idx]

    def tuned(self, method: str, source: int, target: int, hemi: str, roi: str):
        """(test predictions, test r) of target's ROI voxels from source's tuned backbone, or None if absent."""
        key = (method, source, target, hemi, roi)
        if key not in self._tuned:
            ckpt = models.checkpoint_path(self.out_dir, method, source, hemi, roi, self.checkpoint)
            d = self.subject(target)
            idx = d.roi_voxel_indices[hemi].get(roi, np.array([], dtype=np.int64))
            if not ckpt.is_file() or not len(idx):
                self._tuned[key] = None
            else:
                self.checkpoints_used.add(str(ckpt))
                feats = self.features(target, str(ckpt), [self.tuned_layer])[self.tuned_layer]
                self._tuned[key] = encode_test(feats, d.fmri[hemi], d.split, idx, self.alphas(True), self.device)
        return self._tuned[key]

    def test_truth(self, subject: int, hemi: str, roi: str) -> np.ndarray:
        d = self.subject(subject)
        return d.fmri[hemi][d.split["test"]][:, d.roi_voxel_indices[hemi][roi]]
