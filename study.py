"""The encoding study: each subject loaded once, one layer search for every feature set, test-split fits.

Every feature set (the untuned AlexNet, and the CL- and reg-tuned backbone of each ROI) gets the same
treatment: all AlexNet layers from one forward pass, PCA(pca_components) fitted on train for wide layers,
features scaled to unit mean variance, ridge with one alpha per voxel chosen on a hold-out of train, the
layer with the best median val r kept per ROI; test scores come from a fit on train with alphas chosen on val.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import encoding
import features
import models
import options
import outputs
import runtime
import significance
import utils

TUNED_METHODS = ("reg", "cl")                   # per-subject tuned backbones
POOLED_SETS = ("pooled-reg", "pooled-cl")        # one backbone tuned on every subject's fMRI of an ROI
FEATURE_SETS = ("untuned",) + TUNED_METHODS + POOLED_SETS


def layer_roi_scores(layer_features: dict, fmri: np.ndarray, split: dict, roi_indices: dict, alphas,
                     alpha_holdout: float = 0.1, seed: int = 0, device=None, desc: str = "ridge per layer",
                     statistic: str = "median"):
    """Layers x ROIs median (or mean) val Pearson r of ridge models of the given voxels (NaN for empty ROIs).

    fmri: images x voxels (only the voxels roi_indices point into are needed). Each voxel's alpha is chosen
    on a hold-out of the train split, so the val split only scores.
    """
    summarize = {"median": np.nanmedian, "mean": np.nanmean}[statistic]
    from sklearn.model_selection import train_test_split
    fit_rows, hold_rows = train_test_split(np.arange(len(split["train"])), test_size=alpha_holdout, random_state=seed)
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
                scores[i, j] = summarize(r[idx])
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
        raise options.DataError(f"{path}: not found; run get_best_alex_layer.py for subject {subject} first")
    return json.loads(path.read_text())


def encode_test(layer_features: dict, fmri: np.ndarray, split: dict, voxel_indices, alphas, device=None,
                per_roi_alpha: bool = False):
    """Fit ridge on train (alpha chosen on val per voxel, or one per ROI, or one fixed alpha); predict test.

    Returns (test predictions n_test x v, test r per voxel) for the given voxels. A grid of alphas works
    on unit-scaled features; one fixed alpha (the paper's mode) on the features as they are.
    per_roi_alpha: one alpha for all the voxels, the one with the best mean val r (the 2023 original).
    """
    if np.ndim(alphas) and len(alphas) > 1:
        layer_features = encoding.unit_scale(layer_features)
    y = fmri[:, voxel_indices]
    model = encoding.fit_ridge(layer_features["train"], y[split["train"]], layer_features["val"], y[split["val"]],
                               alphas=alphas, device=device)
    if per_roi_alpha and model.val_scores_ is not None:
        best = model.alpha_grid_[int(np.nanargmax(np.nanmean(model.val_scores_, axis=1)))]
        model = encoding.fit_ridge(layer_features["train"], y[split["train"]], device=device,
                                   voxel_alphas=np.full(y.shape[1], best))
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
                 keep_search_features: bool = False, noise_ceiling_dir=None, layer_statistic: str = "median",
                 pooled_h_method: str = "constant"):
        self.data_dir, self.out_dir, self.hemispheres = data_dir, out_dir, list(hemispheres)
        self.weights, self.image_size, self.split_seed = weights, image_size, split_seed
        self.pca_components, self.seed, self.batch_size = pca_components, seed, batch_size
        self.alpha_mode, self.alpha_grid, self.alpha_holdout = alpha_mode, alphas, alpha_holdout
        self.tuned_layer, self.checkpoint, self.device, self.layers = tuned_layer, checkpoint, device, list(layers)
        self.keep_search_features, self.noise_ceiling_dir = keep_search_features, noise_ceiling_dir
        self.layer_statistic, self.pooled_h_method = layer_statistic, pooled_h_method
        if alpha_mode not in ("per-voxel", "per-roi", "paper"):
            raise options.OptionsError(f"--alpha_mode={alpha_mode}: expected per-voxel, per-roi or paper")
        if tuned_layer not in ("best", "untuned") and tuned_layer not in self.layers:
            raise options.OptionsError(f"--tuned_layer={tuned_layer}: expected best, untuned or one of "
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
                                                         self.split_seed, self.hemispheres,
                                                         noise_ceiling_dir=self.noise_ceiling_dir)
        return self._subjects[subject]

    def features(self, subject: int, spec: str, layers, challenge_images=None) -> dict:
        """{layer: {'train'|'val'|'test'[|'challenge']: features}} of a subject's images through a backbone
        (cached; 'challenge': the challenge test images, when given)."""
        sets = features.subject_image_sets(self.subject(subject), challenge_images=challenge_images)
        return features.layer_features(self.out_dir, subject, spec, layers, sets, self.image_size,
                                       self.pca_components, self.seed, self.device, self.batch_size)

    # ---- layers ----

    def untuned_layer(self, subject: int, hemi: str, roi: str) -> str | None:
        return load_best_layers(self.out_dir, subject, hemi).get(roi)

    def checkpoint_of(self, feature_set: str, source: int | None, hemi: str, roi: str,
                      exclude_subject: int | None = None) -> Path | None:
        """The checkpoint behind a tuned feature set ('reg', 'cl': source's own; 'pooled-*': shared), if trained."""
        if feature_set in TUNED_METHODS:
            path = models.checkpoint_path(self.out_dir, feature_set, source, hemi, roi, self.checkpoint)
        elif feature_set in POOLED_SETS:
            path = models.pooled_checkpoint_path(self.out_dir, feature_set.split("-", 1)[1], hemi, roi,
                                                 exclude_subject, self.checkpoint, self.pooled_h_method)
        else:
            raise ValueError(f"unknown feature set {feature_set!r}; expected one of {', '.join(FEATURE_SETS)}")
        return path if path.is_file() else None

    def layer_of(self, feature_set: str, subject: int, hemi: str, roi: str, source: int | None = None,
                 exclude_subject: int | None = None) -> str | None:
        """The layer a feature set is read at for subject's ROI (a tuned backbone searched first if tuned_layer='best').

        Per-subject backbones are searched on their own subject (source); pooled ones on the encoded subject.
        """
        if feature_set == "untuned":
            return self.untuned_layer(subject, hemi, roi)
        source = subject if source is None else source
        ckpt = self.checkpoint_of(feature_set, source, hemi, roi, exclude_subject)
        if ckpt is None:
            return None
        if self.tuned_layer == "untuned":
            return self.untuned_layer(source if feature_set in TUNED_METHODS else subject, hemi, roi)
        if self.tuned_layer != "best":
            return self.tuned_layer
        search_subject = source if feature_set in TUNED_METHODS else subject
        name = feature_set if exclude_subject is None else f"{feature_set}-loso"
        return self.search_layers(name, ckpt, search_subject, hemi, roi)["layer"]

    def search_layers(self, name: str, ckpt: Path, subject: int, hemi: str, roi: str) -> dict:
        """Median val r of every layer of a tuned backbone for subject's ROI voxels; cached per checkpoint.

        -> {'layer': best layer, 'val_r': {layer: r}, 'statistic', 'checkpoint': tag}; saved in
        best_layer/subjXX/{hemi}_best_layer_{name}.json beside the untuned search.
        """
        tag = features.backbone_spec_tag(str(ckpt))
        path = best_layer_path(self.out_dir, subject, hemi, name)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        entry = saved.get(roi)
        if (entry and entry.get("checkpoint") == tag and list(entry["val_r"]) == self.layers
                and entry.get("statistic") == self.layer_statistic):
            return entry
        d = self.subject(subject)
        idx = d.roi_voxel_indices[hemi][roi]
        self.checkpoints_used.add(str(ckpt))
        start = time.perf_counter()  # the search's cost (forward pass, PCAs, ridges) is recorded with its result
        feats = self.features(subject, str(ckpt), self.layers)
        scores = layer_roi_scores(feats, np.asarray(d.fmri[hemi][:, idx]), d.split, {roi: np.arange(len(idx))},
                                  self.alpha_grid, self.alpha_holdout, self.seed, self.device,
                                  desc=f"{name} {utils.subject_dir_name(subject)} {hemi} {roi} layer search",
                                  statistic=self.layer_statistic)[:, 0]
        entry = {"layer": self.layers[int(np.nanargmax(scores))], "checkpoint": tag,
                 "statistic": self.layer_statistic, "val_r": dict(zip(self.layers, scores.tolist())),
                 "search_seconds": round(time.perf_counter() - start, 2)}
        saved[roi] = entry
        outputs.save_json(path, saved, {"layers": self.layers, "pca_components": self.pca_components,
                                        "alphas": list(self.alpha_grid), "alpha_holdout": self.alpha_holdout},
                          subject=subject, hemisphere=hemi, feature_set=name,
                          metric=f"{self.layer_statistic} val Pearson r of the ROI's voxels per layer")
        if not self.keep_search_features:
            features.drop_cached_layers(self.out_dir, subject, str(ckpt), keep=[entry["layer"]])
        return entry

    def layer_scores(self, name: str, subject: int, hemi: str, rois) -> np.ndarray:
        """Layers x ROIs val r of a tuned set's searches (NaN where no model was searched)."""
        path = best_layer_path(self.out_dir, subject, hemi, name)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        return np.array([[saved.get(roi, {}).get("val_r", {}).get(layer, np.nan) for roi in rois]
                         for layer in self.layers], dtype=float)

    # ---- test-split fits ----

    def untuned(self, subject: int, hemi: str, roi: str):
        """(test predictions, test r) of the ROI's voxels from the untuned best-layer model."""
        layer = self.untuned_layer(subject, hemi, roi)
        if layer is None:
            return None
        d = self.subject(subject)
        idx = d.roi_voxel_indices[hemi][roi]
        per_roi = self.alpha_mode == "per-roi"
        key = (subject, hemi, layer, roi if per_roi else None)  # per-voxel alphas: one fit serves every ROI
        if key not in self._untuned:
            feats = self.features(subject, f"untuned:{self.weights}", [layer])[layer]
            voxels = idx if per_roi else np.arange(d.fmri[hemi].shape[1])
            self._untuned[key] = encode_test(feats, d.fmri[hemi], d.split, voxels, self.alphas(False), self.device,
                                             per_roi)
        prediction, r = self._untuned[key]
        return (prediction, r) if per_roi else (prediction[:, idx], r[idx])

    def fit(self, feature_set: str, subject: int, hemi: str, roi: str, source: int | None = None,
            exclude_subject: int | None = None):
        """(test predictions, test r) of subject's ROI voxels from a feature set, or None where it has no model.

        source: the subject whose per-subject backbone is used (cross-subject; default: subject itself);
        exclude_subject: the pooled backbone trained without that subject (leave-one-subject-out).
        """
        if feature_set == "untuned":
            return self.untuned(subject, hemi, roi)
        source = subject if source is None else source
        key = (feature_set, source, subject, hemi, roi, exclude_subject)
        if key not in self._tuned:
            d = self.subject(subject)
            idx = d.roi_voxel_indices[hemi].get(roi, np.array([], dtype=np.int64))
            ckpt = self.checkpoint_of(feature_set, source, hemi, roi, exclude_subject) if len(idx) else None
            if ckpt is None:
                self._tuned[key] = None
            else:
                layer = self.layer_of(feature_set, subject, hemi, roi, source, exclude_subject)
                self.checkpoints_used.add(str(ckpt))
                feats = self.features(subject, str(ckpt), [layer])[layer]
                self._tuned[key] = encode_test(feats, d.fmri[hemi], d.split, idx, self.alphas(True), self.device,
                                               self.alpha_mode == "per-roi")
        return self._tuned[key]

    def retrieval(self, feature_set: str, subject: int, hemi: str, roi: str, n_candidates: int = 300,
                  n_boot: int = 1000, seed: int = 0) -> dict:
        """fMRI -> image retrieval of a contrastive model on subject's test split (significance.retrieval_accuracy).

        Embeddings come in batches of the model's training batch size with BatchNorm on each batch's own
        statistics per modality, exactly as the model was trained and validated.
        """
        import torch
        ckpt = self.checkpoint_of(feature_set, subject, hemi, roi)
        meta = models.load_checkpoint(ckpt)
        model = models.load_roi_model(ckpt, self.device)
        source = models.checkpoint_source_index(meta, subject)
        d = self.subject(subject)
        rows = np.asarray(d.split["test"])
        fmri = np.asarray(d.fmri[hemi][rows], dtype=np.float32)[:, d.roi_voxel_indices[hemi][roi]]
        batch_size = int(meta.get("settings", {}).get("batch_size", self.batch_size))
        embeddings = []
        with torch.no_grad(), models.batch_statistics(model):
            for b in np.array_split(np.arange(len(rows)), max(1, -(-len(rows) // batch_size))):
                x = runtime.prepare_images(d.images[rows[b]], self.device)
                f, g = model(x, torch.from_numpy(fmri[b]).to(self.device), source)
                embeddings.append((f.float().cpu().numpy(), g.float().cpu().numpy()))
        self.checkpoints_used.add(str(ckpt))
        return significance.retrieval_accuracy(np.concatenate([e[0] for e in embeddings]),
                                               np.concatenate([e[1] for e in embeddings]),
                                               n_candidates=n_candidates, n_boot=n_boot, seed=seed)

    def test_truth(self, subject: int, hemi: str, roi: str) -> np.ndarray:
        d = self.subject(subject)
        return np.asarray(d.fmri[hemi][d.split["test"]])[:, d.roi_voxel_indices[hemi][roi]]
