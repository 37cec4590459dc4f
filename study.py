"""The encoding study: each subject loaded once, one layer search for every feature set, test-split fits.

Every feature set (the untuned AlexNet, and the CL- and reg-tuned backbone of each ROI) gets the same
treatment: all AlexNet layers from one forward pass, PCA(pca_components) fitted on train for wide layers,
features scaled to unit mean variance, ridge with one alpha per voxel chosen on a hold-out of train, the
layer with the best median val r kept per ROI; test scores come from a fit on train with alphas chosen on val.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

import encoding
import features
import models
import outputs
import utils

TUNED_METHODS = ("reg", "cl")


def layer_roi_scores(layer_features: dict, fmri: np.ndarray, split: dict, roi_indices: dict, alphas,
                     alpha_holdout: float = 0.1, seed: int = 0, device=None, desc: str = "ridge per layer"):
    """Layers x ROIs median val Pearson r of ridge models of the given voxels (NaN for empty ROIs).

    fmri: images x voxels (only the voxels roi_indices point into are needed). Each voxel's alpha is chosen
    on a hold-out of the train split, so the val split only scores.
    """
    fit_rows, hold_rows = encoding.holdout_split(np.arange(len(split["train"])), alpha_holdout, seed)
    y_train = fmri[split["train"]]
    y_val = fmri[split["val"]]
    scores = np.full((len(layer_features), len(roi_indices)), np.nan)
    for i, layer in enumerate(tqdm(layer_features, desc=desc, unit="layer", leave=False)):
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


def best_layer_path(out_dir, subject: int, hemi: str, feature_set: str = "untuned") -> Path:
    """out_dir/best_layer/subjXX/{hemi}_best_layer.json (untuned) or {hemi}_best_layer_{set}.json (tuned sets)."""
    suffix = "" if feature_set == "untuned" else f"_{feature_set}"
    return Path(out_dir) / "best_layer" / utils.subject_dir_name(subject) / f"{hemi}_best_layer{suffix}.json"


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
    """Loads each subject once; searches, caches and memoises the layer and encoding fits of every feature set.

    tuned_layer: 'best' (each tuned backbone searched over `layers` like the untuned one), 'untuned' (the
    ROI's best untuned layer, as the 2023 original), or one layer name for every tuned backbone.
    """

    def __init__(self, data_dir, out_dir, hemispheres, weights: str, image_size: int, split_seed: int,
                 pca_components: int, seed: int, batch_size: int, alpha_mode: str, alphas, tuned_layer: str,
                 checkpoint: str, device, layers=models.ALEXNET_LAYERS, alpha_holdout: float = 0.1,
                 keep_search_features: bool = False):
        self.data_dir, self.out_dir, self.hemispheres = data_dir, out_dir, list(hemispheres)
        self.weights, self.image_size, self.split_seed = weights, image_size, split_seed
        self.pca_components, self.seed, self.batch_size = pca_components, seed, batch_size
        self.alpha_mode, self.alpha_grid, self.alpha_holdout = alpha_mode, alphas, alpha_holdout
        self.tuned_layer, self.checkpoint, self.device, self.layers = tuned_layer, checkpoint, device, list(layers)
        self.keep_search_features = keep_search_features
        if tuned_layer not in ("best", "untuned") and tuned_layer not in self.layers:
            raise utils.OptionsError(f"--tuned_layer={tuned_layer}: expected best, untuned or one of "
                                     + ", ".join(self.layers))
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

    def features(self, subject: int, spec: str, layers) -> dict:
        """{layer: {'train'|'val'|'test': features}} of a subject's images through a backbone (cached)."""
        return features.layer_features(self.out_dir, subject, spec, layers,
                                       features.subject_image_sets(self.subject(subject)), self.image_size,
                                       self.pca_components, self.seed, self.device, self.batch_size)

    # ---- layers ----

    def untuned_layer(self, subject: int, hemi: str, roi: str) -> str | None:
        return load_best_layers(self.out_dir, subject, hemi).get(roi)

    def tuned_layer_of(self, method: str, subject: int, hemi: str, roi: str) -> str | None:
        """The layer a tuned backbone (of subject's ROI) is read at, searching it first when tuned_layer='best'."""
        if self.tuned_layer == "untuned":
            return self.untuned_layer(subject, hemi, roi)
        if self.tuned_layer != "best":
            return self.tuned_layer
        ckpt = models.checkpoint_path(self.out_dir, method, subject, hemi, roi, self.checkpoint)
        if not ckpt.is_file():
            return None
        return self.search_tuned_layers(method, subject, hemi, roi)["layer"]

    def search_tuned_layers(self, method: str, subject: int, hemi: str, roi: str) -> dict:
        """Median val r of every layer of the ROI's tuned backbone on its own subject; cached per checkpoint.

        -> {'layer': best layer, 'median_val_r': {layer: r}, 'checkpoint': tag}; saved in
        best_layer/subjXX/{hemi}_best_layer_{method}.json beside the untuned search.
        """
        ckpt = models.checkpoint_path(self.out_dir, method, subject, hemi, roi, self.checkpoint)
        tag = features.backbone_spec_tag(str(ckpt))
        path = best_layer_path(self.out_dir, subject, hemi, method)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        entry = saved.get(roi)
        if entry and entry.get("checkpoint") == tag and list(entry["median_val_r"]) == self.layers:
            return entry
        d = self.subject(subject)
        idx = d.roi_voxel_indices[hemi][roi]
        self.checkpoints_used.add(str(ckpt))
        feats = self.features(subject, str(ckpt), self.layers)
        scores = layer_roi_scores(feats, np.asarray(d.fmri[hemi][:, idx]), d.split, {roi: np.arange(len(idx))},
                                  self.alpha_grid, self.alpha_holdout, self.seed, self.device,
                                  desc=f"{method} {utils.subject_dir_name(subject)} {hemi} {roi} layer search")[:, 0]
        entry = {"layer": self.layers[int(np.nanargmax(scores))], "checkpoint": tag,
                 "median_val_r": dict(zip(self.layers, scores.tolist()))}
        saved[roi] = entry
        outputs.save_json(path, saved, {"layers": self.layers, "pca_components": self.pca_components,
                                        "alphas": list(self.alpha_grid), "alpha_holdout": self.alpha_holdout},
                          subject=subject, hemisphere=hemi, feature_set=method,
                          metric="median val Pearson r of the ROI's voxels per layer")
        if not self.keep_search_features:
            features.drop_cached_layers(self.out_dir, subject, str(ckpt), keep=[entry["layer"]])
        return entry

    def tuned_layer_scores(self, method: str, subject: int, hemi: str, rois) -> np.ndarray:
        """Layers x ROIs median val r of the tuned backbones' searches (NaN where no model was searched)."""
        path = best_layer_path(self.out_dir, subject, hemi, method)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        return np.array([[saved.get(roi, {}).get("median_val_r", {}).get(layer, np.nan) for roi in rois]
                         for layer in self.layers], dtype=float)

    # ---- test-split fits ----

    def untuned(self, subject: int, hemi: str, roi: str):
        """(test predictions, test r) of the ROI's voxels from the untuned best-layer model."""
        layer = self.untuned_layer(subject, hemi, roi)
        if layer is None:
            return None
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
            layer = self.tuned_layer_of(method, source, hemi, roi) if ckpt.is_file() and len(idx) else None
            if layer is None:
                self._tuned[key] = None
            else:
                self.checkpoints_used.add(str(ckpt))
                feats = self.features(target, str(ckpt), [layer])[layer]
                self._tuned[key] = encode_test(feats, d.fmri[hemi], d.split, idx, self.alphas(True), self.device)
        return self._tuned[key]

    def test_truth(self, subject: int, hemi: str, roi: str) -> np.ndarray:
        d = self.subject(subject)
        return np.asarray(d.fmri[hemi][d.split["test"]])[:, d.roi_voxel_indices[hemi][roi]]
