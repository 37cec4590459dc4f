"""The encoding study: its settings, each subject loaded once, the models and searches behind every feature set,
and test-split fits (seed-averaged for tuned sets).

Every feature set gets the same treatment: its layer chosen by the layer search (search.py: PCA on train for wide
layers, unit-scaled features, ridge with one alpha per voxel, cross-fitted on the val split), then a ridge model
per voxel fitted on train with its alpha chosen on val, scored on the test split, which no choice ever sees.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

import backbones
import encoding
import feature_sets
import features
import models
import options
import paths
import runtime
import search
import significance
import utils

ALPHA_MODES = ("per-voxel", "per-roi", "untuned-per-roi", "paper")
FEATURE_SCALINGS = ("auto", "unit", "none")


@dataclass(frozen=True)
class StudySettings:
    """What every stage that reads features agrees on: taken from a script's options by name (from_options)."""
    data_dir: str
    out_dir: str
    hemispheres: tuple = utils.HEMISPHERES
    backbone: str = "alexnet"                  # a backbones.parse name (kept canonical)
    weights: str = "DEFAULT"                   # kept canonical (models.weights_name: DEFAULT resolved for torchvision)
    image_size: int = 224
    layers: tuple = ()                         # searched for every backbone set; () = the backbone's default layers
    pca_components: int = 1000
    alphas: tuple = encoding.ALPHAS            # the ridge alpha grid ([] in a script: encoding.ALPHAS)
    alpha_mode: str = "per-voxel"
    feature_scaling: str = "auto"
    layer_statistic: str = "median"
    tuned_layer: str = "best"                  # best (each set's own search) | untuned | a layer name
    checkpoint: str = "best"
    seeds: tuple = ()                          # tuned models' seeds; () = every seed trained
    pooled_h_method: str = "constant"
    noise_ceiling_dir: str | None = None
    features_dir: str | None = None            # external:<name> sets: features_dir/subjXX/<name>/*.npy
    split_seed: int = 0
    seed: int = 0                              # PCA seed and the val halves of the search
    batch_size: int = 128
    device: str = "auto"
    fit_split: str = "train"                   # train | train+val: what the test-split models are fitted on
    keep_search_features: bool = False
    search_missing: bool = False               # results: search a missing layer search instead of failing

    @classmethod
    def from_options(cls, config: dict, **overrides) -> "StudySettings":
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        values.update(overrides)
        values["hemispheres"] = tuple(utils.check_hemisphere(h) for h in values.get("hemispheres") or
                                      utils.HEMISPHERES)
        values["layers"] = tuple(str(layer) for layer in values.get("layers") or ())
        values["alphas"] = tuple(float(a) for a in (values.get("alphas") or encoding.ALPHAS))
        values["seeds"] = tuple(int(s) for s in values.get("seeds") or ())
        for name in ("noise_ceiling_dir", "features_dir"):
            values[name] = values.get(name) or None
        settings = cls(**values)
        settings.check()
        return settings

    def __post_init__(self):
        backbone = backbones.parse(self.backbone).name
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "weights", models.weights_name(backbone, self.weights))
        object.__setattr__(self, "layers", tuple(self.layers) or backbones.default_layers(backbone))

    def check(self) -> None:
        models.check_image_size(self.backbone, self.weights, self.image_size)
        backbones.check_layers(models.weightless_backbone(self.backbone), self.layers)
        for name, value, allowed in (("alpha_mode", self.alpha_mode, ALPHA_MODES),
                                     ("feature_scaling", self.feature_scaling, FEATURE_SCALINGS),
                                     ("layer_statistic", self.layer_statistic, search.STATISTICS),
                                     ("checkpoint", self.checkpoint, paths.CHECKPOINTS),
                                     ("fit_split", self.fit_split, ("train", "train+val"))):
            if value not in allowed:
                raise options.OptionsError(f"--{name}={value}: expected one of {', '.join(allowed)}")
        if self.fit_split == "train+val" and self.checkpoint != "last":
            raise options.OptionsError("--fit_split=train+val: models fine-tuned on train + val have no held-out epoch "
                                       "choice; use --checkpoint=last")
        if self.tuned_layer not in ("best", "untuned") and self.tuned_layer not in self.layers:
            raise options.OptionsError(f"--tuned_layer={self.tuned_layer}: expected best, untuned or one of "
                                       + ", ".join(self.layers))

    def untuned_spec(self) -> str:
        """'untuned:<backbone>:<weights>': the untuned network's features (features.load_backbone)."""
        return features.untuned_spec(self.backbone, self.weights)


@dataclass
class SetFit:
    """Test-split predictions of one feature set for one ROI (tuned sets: averaged over the seeds' models)."""
    prediction: np.ndarray          # test images x voxels
    r: np.ndarray                   # test r per voxel of `prediction`
    per_seed: list = field(default_factory=list)   # [{'seed', 'layer', 'r', 'alphas', 'run_dir'}] (untuned: one)

    @property
    def layers(self) -> list:
        return [s["layer"] for s in self.per_seed]


def encode_test(layer_features: dict, fmri: np.ndarray, split: dict, voxel_indices, alphas, device=None,
                per_roi_alpha: bool = False, feature_scaling: str = "auto", voxel_alphas=None,
                fit_split: str = "train"):
    """Fit ridge on train (alpha per voxel chosen on val, or one per ROI, or one fixed alpha, or given voxel_alphas);
    predict test. fit_split='train+val': refit on train + val with those alphas (the original's 85 %).
    -> (test predictions n_test x v, test r per voxel, the alpha of each voxel)."""
    layer_features = search.scaled(layer_features, feature_scaling, len(np.atleast_1d(alphas)))
    y = fmri[:, voxel_indices]
    if voxel_alphas is not None:
        model = encoding.fit_ridge(layer_features["train"], y[split["train"]], voxel_alphas=voxel_alphas,
                                   device=device)
    else:
        model = encoding.fit_ridge(layer_features["train"], y[split["train"]], layer_features["val"],
                                   y[split["val"]], alphas=alphas, device=device)
        if per_roi_alpha and model.val_scores_ is not None:
            best = model.alpha_grid_[int(np.nanargmax(np.nanmean(model.val_scores_, axis=1)))]
            model = encoding.fit_ridge(layer_features["train"], y[split["train"]], device=device,
                                       voxel_alphas=np.full(y.shape[1], best))
    if fit_split == "train+val":
        rows = np.concatenate([split["train"], split["val"]])
        model = encoding.fit_ridge(np.concatenate([layer_features["train"], layer_features["val"]]), y[rows],
                                   voxel_alphas=model.alphas_, device=device)
    prediction = model.predict(layer_features["test"])
    return prediction, encoding.pearson_r(y[split["test"]], prediction), model.alphas_


class EncodingStudy:
    """Loads each subject once; finds the models and reads the layer searches behind every feature set; fits and
    scores encoding models on the test split. Fits are kept in a small cache, so memory stays flat over a study."""

    def __init__(self, settings: StudySettings, fit_cache: int = 8):
        self.s = settings
        self.device = runtime.resolve_device(settings.device)
        self._subjects: dict = {}
        self._subjects_used: set = set()
        self._fits: OrderedDict = OrderedDict()
        self._fit_cache = fit_cache
        self.checkpoints_used: set = set()
        self._checked: set = set()  # checkpoints whose backbone was checked

    def provenance(self) -> dict:
        """What results so far came from: the split files and the model checkpoints (for sidecars)."""
        return {"split_files": [str(paths.split_file(self.s.out_dir, s)) for s in sorted(self._subjects_used)],
                "checkpoints": sorted(self.checkpoints_used)}

    def release(self, subject: int) -> None:
        """Forget a subject's data and fits (unmaps its fMRI and images); loaded again when next used."""
        self._subjects.pop(subject, None)
        for key in [k for k in self._fits if k[1] == subject]:
            del self._fits[key]

    def alphas(self, tuned: bool):
        """The alpha grid, or the paper's fixed alpha (untuned 1e3, tuned 1e4) in paper mode."""
        if self.s.alpha_mode == "paper":
            return [encoding.PAPER_ALPHA_TUNED if tuned else encoding.PAPER_ALPHA_UNTUNED]
        return list(self.s.alphas)

    def subject(self, subject: int) -> utils.Subject:
        self._subjects_used.add(subject)
        if subject not in self._subjects:
            self._subjects[subject] = utils.load_subject(self.s.data_dir, subject, self.s.out_dir, self.s.image_size,
                                                         self.s.split_seed, self.s.hemispheres,
                                                         noise_ceiling_dir=self.s.noise_ceiling_dir)
        return self._subjects[subject]

    def features(self, subject: int, spec: str, layers, challenge_images=None) -> dict:
        """{layer: {'train'|'val'|'test'[|'challenge']: features}} of a subject's images through a backbone
        (cached on disk; 'challenge': the challenge test images, when given)."""
        sets = features.subject_image_sets(self.subject(subject), challenge_images=challenge_images)
        return features.layer_features(self.s.out_dir, subject, spec, layers, sets, self.s.image_size,
                                       self.s.pca_components, self.s.seed, self.device, self.s.batch_size,
                                       self.s.features_dir)

    def layers_of(self, feature_set: str, subject: int) -> list[str]:
        """The layers searched for a set: settings.layers for the backbone's sets; an external set's own files."""
        if feature_sets.is_external(feature_set):
            return features.external_layers(self.s.features_dir, subject, feature_set)
        return list(self.s.layers)

    # ---- the models behind a tuned feature set ----

    def run_dirs(self, feature_set: str, subject: int, hemi: str, roi: str,
                 exclude_subject: int | None = None) -> list[tuple[int, Path]]:
        """(seed, model folder) of every trained model of a tuned set: `subject`'s own (reg, cl) or the pooled one
        (pooled-*: every subject's; exclude_subject: the one trained without that subject), seeds as settings."""
        method = feature_sets.method_of(feature_set)
        pooled = feature_sets.is_pooled(feature_set)
        base = paths.model_dir(self.s.out_dir, method, hemi, roi, subject=None if pooled else subject,
                               backbone=self.s.backbone, exclude_subject=exclude_subject if pooled else None,
                               pooled_h_method=self.s.pooled_h_method).parent
        found = []
        for folder in sorted(base.glob("seed*")) if base.is_dir() else []:
            match = re.fullmatch(r"seed(\d+)", folder.name)
            if match and (not self.s.seeds or int(match.group(1)) in self.s.seeds) and \
                    paths.checkpoint_file(folder, self.s.checkpoint).is_file():
                found.append((int(match.group(1)), folder))
        return found

    def checkpoint(self, run_dir) -> Path:
        """A tuned model's checkpoint, refused (one line) when trained with another backbone than settings'."""
        path = paths.checkpoint_file(run_dir, self.s.checkpoint)
        if path not in self._checked and path.is_file():
            backbones.check_same_backbone(path, models.checkpoint_backbone(path), self.s.backbone)
            self._checked.add(path)
        return path

    # ---- layer searches ----

    def search_key(self, feature_set: str, subject: int, run_dir=None) -> dict:
        """Every option that changes a search's result, and the identity of what was searched."""
        key = {"format": search.SEARCH_FORMAT, "feature_set": feature_set,
               "layers": self.layers_of(feature_set, subject),
               "pca_components": self.s.pca_components, "alphas": list(self.s.alphas),
               "feature_scaling": self.s.feature_scaling, "selection": search.SELECTION,
               "statistic": self.s.layer_statistic, "seed": self.s.seed, "image_size": self.s.image_size,
               "split": search.split_identity(self.subject(subject).split)}
        if feature_sets.is_external(feature_set):
            folder = features.external_dir(self.s.features_dir, subject, feature_set)
            key["features_dir"] = str(Path(self.s.features_dir).resolve())
            key["files"] = [search.file_identity(folder / f"train_{layer}.npy") for layer in key["layers"]]
        else:
            key["backbone"] = self.s.backbone
        if run_dir is not None:
            key["model"] = search.file_identity(self.checkpoint(run_dir))
            key["checkpoint"] = self.s.checkpoint
        elif feature_set == feature_sets.UNTUNED:
            key["weights"] = self.s.weights
        return key

    def search_file(self, feature_set: str, subject: int, hemi: str, run_dir=None) -> Path:
        return paths.search_file(self.s.out_dir, subject, hemi, backbone=self.s.backbone, feature_set=feature_set,
                                 run_dir=run_dir)

    def search_command(self, feature_set: str, subject: int) -> str:
        return (f"get_best_alex_layer.py --feature_sets={feature_set} --subjects={subject} with the same options, "
                "or add --search_missing=true")

    def search(self, feature_set: str, subject: int, hemi: str, run_dir=None) -> dict:
        """The saved layer search of a feature set on a subject's hemisphere (one tuned model: run_dir); searched
        first when missing or stale only if settings.search_missing, else one line naming the command."""
        path = self.search_file(feature_set, subject, hemi, run_dir)
        key = self.search_key(feature_set, subject, run_dir)
        if self.s.search_missing and search.saved_key(path) != key:
            self.run_search(feature_set, subject, [hemi], run_dir, {})
        return search.read_search(path, key, self.search_command(feature_set, subject))

    def run_search(self, feature_set: str, subject: int, hemispheres, run_dir=None, script_options=None,
                   roi: str | None = None) -> float:
        """Search every layer for a subject: untuned / external sets over every ROI of the hemispheres (one forward
        pass), a tuned model (run_dir) over its ROI. Writes the search files; returns the seconds it took."""
        start = time.perf_counter()
        d = self.subject(subject)
        spec = feature_set if feature_sets.is_external(feature_set) else \
            str(self.checkpoint(run_dir)) if run_dir is not None else self.s.untuned_spec()
        if run_dir is not None:
            self.checkpoints_used.add(spec)
        layers = self.layers_of(feature_set, subject)
        layer_features = self.features(subject, spec, layers)
        widths = features.raw_widths(spec, layers, self.s.image_size, self.s.features_dir, subject)
        reduction = {layer: {"features": widths[layer], "kept": int(layer_features[layer]["train"].shape[1]),
                             "reduction": "PCA fitted on train" if widths[layer] > self.s.pca_components else "none"}
                     for layer in layers}  # PCA keeps min(pca_components, train images - 1) components
        seconds_per_hemi = {}
        for hemi in hemispheres:
            t_hemi = time.perf_counter()
            rois = d.roi_voxel_indices[hemi] if roi is None else {roi: d.roi_voxel_indices[hemi][roi]}
            scores = search.layer_roi_scores(layer_features, d.fmri[hemi], d.split, rois, list(self.s.alphas),
                                             self.s.seed, self.device, self.s.layer_statistic,
                                             self.s.feature_scaling,
                                             desc=f"{feature_set} {paths.subject_dir_name(subject)} {hemi} search")
            result = search.search_result(scores, layers, rois, self.s.layer_statistic)
            seconds_per_hemi[hemi] = time.perf_counter() - t_hemi
            search.write_search(self.search_file(feature_set, subject, hemi, run_dir), result,
                                self.search_key(feature_set, subject, run_dir),
                                time.perf_counter() - start if hemi == hemispheres[0] else seconds_per_hemi[hemi],
                                script_options or {}, subject=subject, hemisphere=hemi, feature_set=feature_set,
                                model=str(run_dir) if run_dir is not None else None, reduction=reduction)
        if run_dir is not None and not self.s.keep_search_features:
            chosen = {entry["layer"] for h in hemispheres for entry in
                      search.read_search(self.search_file(feature_set, subject, h, run_dir),
                                         self.search_key(feature_set, subject, run_dir), "")["rois"].values()}
            features.drop_cached_layers(self.s.out_dir, subject, spec, keep=chosen)
        return time.perf_counter() - start

    def layer_of(self, feature_set: str, subject: int, hemi: str, roi: str, run_dir=None,
                 source: int | None = None) -> str | None:
        """The layer a feature set is read at for a subject's ROI: its own search (tuned_layer='best'), the ROI's
        untuned layer ('untuned': of the backbone's subject `source` for per-subject sets), or a fixed layer.
        A tuned model (run_dir) is searched on its own subject (per subject) or the encoded subject (pooled)."""
        if feature_set == feature_sets.UNTUNED or feature_sets.is_external(feature_set):
            return self.search(feature_set, subject, hemi)["rois"].get(roi, {}).get("layer")
        if self.s.tuned_layer == "untuned":
            return self.layer_of(feature_sets.UNTUNED, subject if source is None else source, hemi, roi)
        if self.s.tuned_layer != "best":
            return self.s.tuned_layer
        searched_on = subject if feature_sets.is_pooled(feature_set) or source is None else source
        return self.search(feature_set, searched_on, hemi, run_dir)["rois"][roi]["layer"]

    # ---- test-split fits ----

    def fit(self, feature_set: str, subject: int, hemi: str, roi: str, source: int | None = None,
            exclude_subject: int | None = None) -> SetFit | None:
        """Test predictions and r of a subject's ROI voxels from a feature set, or None where it has no model.

        source: the subject whose per-subject backbone is used (cross-subject; default: subject itself);
        exclude_subject: the pooled backbone trained without that subject (leave-one-subject-out).
        """
        key = (feature_set, subject, hemi, roi, source, exclude_subject)
        if key in self._fits:
            self._fits.move_to_end(key)
            return self._fits[key]
        result = self._fit(feature_set, subject, hemi, roi, subject if source is None else source, exclude_subject)
        self._fits[key] = result
        while len(self._fits) > self._fit_cache:
            self._fits.popitem(last=False)
        return result

    def _fit(self, feature_set, subject, hemi, roi, source, exclude_subject) -> SetFit | None:
        d = self.subject(subject)
        idx = d.roi_voxel_indices[hemi].get(roi, np.array([], dtype=np.int64))
        if not len(idx):
            return None
        per_roi = self.s.alpha_mode == "per-roi"
        if feature_set == feature_sets.UNTUNED or feature_sets.is_external(feature_set):
            layer = self.layer_of(feature_set, subject, hemi, roi)
            if layer is None:
                return None
            spec = self.s.untuned_spec() if feature_set == feature_sets.UNTUNED else feature_set
            feats = self.features(subject, spec, [layer])[layer]
            prediction, r, alphas = encode_test(feats, d.fmri[hemi], d.split, idx, self.alphas(False), self.device,
                                                per_roi or self.s.alpha_mode == "untuned-per-roi",
                                                self.s.feature_scaling, fit_split=self.s.fit_split)
            return SetFit(prediction, r, [{"seed": None, "layer": layer, "r": r, "alphas": alphas, "run_dir": None}])
        runs = self.run_dirs(feature_set, source, hemi, roi, exclude_subject)
        if not runs:
            return None
        voxel_alphas = None
        if self.s.alpha_mode == "untuned-per-roi":  # the 2023 original: the untuned model's alpha for every set
            untuned = self.fit(feature_sets.UNTUNED, subject, hemi, roi)
            voxel_alphas = None if untuned is None else untuned.per_seed[0]["alphas"]
        per_seed = []
        for seed, run_dir in runs:
            layer = self.layer_of(feature_set, subject, hemi, roi, run_dir, source)
            ckpt = str(self.checkpoint(run_dir))
            self.checkpoints_used.add(ckpt)
            feats = self.features(subject, ckpt, [layer])[layer]
            prediction, r, alphas = encode_test(feats, d.fmri[hemi], d.split, idx, self.alphas(True), self.device,
                                                per_roi, self.s.feature_scaling, voxel_alphas, self.s.fit_split)
            per_seed.append({"seed": seed, "layer": layer, "r": r, "alphas": alphas, "run_dir": str(run_dir),
                             "prediction": prediction})
        prediction = np.mean([s.pop("prediction") for s in per_seed], axis=0).astype(np.float32)
        r = per_seed[0]["r"] if len(per_seed) == 1 else encoding.pearson_r(self.test_truth(subject, hemi, roi),
                                                                            prediction)
        return SetFit(prediction, r, per_seed)

    def retrieval(self, feature_set: str, subject: int, hemi: str, roi: str, n_candidates: int = 300,
                  n_boot: int = 1000, seed: int = 0) -> dict | None:
        """fMRI -> image retrieval of a contrastive model on subject's test split (significance.retrieval_accuracy),
        with seeds: the mean of the seeds' accuracies (the CIs of the first seed).

        Embeddings come in batches of the model's training batch size with BatchNorm on each batch's own
        statistics per modality, exactly as the model was trained and validated.
        """
        import torch
        runs = self.run_dirs(feature_set, subject, hemi, roi)
        if not runs:
            return None
        d = self.subject(subject)
        rows = np.asarray(d.split["test"])
        fmri = np.asarray(d.fmri[hemi][rows], dtype=np.float32)[:, d.roi_voxel_indices[hemi][roi]]
        results = []
        for _, run_dir in runs:
            ckpt = self.checkpoint(run_dir)
            meta = models.load_checkpoint(ckpt)
            model = models.roi_model_from_checkpoint(meta, self.device, self.s.backbone, ckpt)
            mean, std = models.normalisation(model)
            source = models.checkpoint_source_index(meta, subject)
            batch_size = int(meta.get("settings", {}).get("batch_size", self.s.batch_size))
            del meta
            embeddings = []
            with torch.no_grad(), models.batch_statistics(model):
                for b in np.array_split(np.arange(len(rows)), max(1, -(-len(rows) // batch_size))):
                    x = runtime.prepare_images(d.images[rows[b]], self.device, False, None, mean, std)
                    f, g = model(x, torch.from_numpy(fmri[b]).to(self.device), source)
                    embeddings.append((f.float().cpu().numpy(), g.float().cpu().numpy()))
            del model
            self.checkpoints_used.add(str(ckpt))
            results.append(significance.retrieval_accuracy(np.concatenate([e[0] for e in embeddings]),
                                                           np.concatenate([e[1] for e in embeddings]),
                                                           n_candidates=n_candidates, n_boot=n_boot, seed=seed))
        out = dict(results[0])
        for key in (k for k in out if k.startswith(("top", "control_")) and not k.endswith(("_low", "_high"))):
            out[key] = float(np.mean([r[key] for r in results]))
        out["n_seeds"] = len(results)
        return out

    def test_truth(self, subject: int, hemi: str, roi: str) -> np.ndarray:
        d = self.subject(subject)
        return np.asarray(d.fmri[hemi][d.split["test"]])[:, d.roi_voxel_indices[hemi][roi]]


def trained_sets(settings: StudySettings) -> list[str]:
    """The tuned feature sets that have models in out_dir for the settings' backbone."""
    root = Path(settings.out_dir) / "models" / paths.backbone_dir_name(settings.backbone)
    found = []
    for name in feature_sets.TUNED:
        method = feature_sets.method_of(name)
        folder = paths.method_dir_name(method, feature_sets.is_pooled(name), settings.pooled_h_method)
        if (root / folder).is_dir():
            found.append(name)
    return found


def search_jobs(study: EncodingStudy, set_names, subjects, hemispheres, rois) -> list[dict]:
    """The layer searches a study needs: per subject one job for the untuned (and each external) set over every ROI
    of the hemispheres; per subject, hemisphere, ROI and trained model one job for each tuned set (pooled: the
    model of all subjects and the one trained without the encoded subject)."""
    jobs = []
    for name in set_names:
        for subject in subjects:
            if not feature_sets.is_tuned(name):
                jobs.append({"feature_set": name, "subject": subject, "hemispheres": list(hemispheres),
                             "roi": None, "run_dir": None, "seed": None})
                continue
            for hemi in hemispheres:
                for roi in rois:
                    runs = study.run_dirs(name, subject, hemi, roi)
                    if feature_sets.is_pooled(name):
                        runs += study.run_dirs(name, subject, hemi, roi, exclude_subject=subject)
                    jobs += [{"feature_set": name, "subject": subject, "hemispheres": [hemi], "roi": roi,
                              "run_dir": run_dir, "seed": seed} for seed, run_dir in runs]
    return jobs


def check_searches(study: EncodingStudy, set_names, subjects, hemispheres, rois) -> int:
    """Read every layer search the results will need (one line naming the command for a missing or stale one)
    before anything is written; -> how many. Only the untuned ones unless tuned sets read their own searches."""
    if study.s.search_missing:
        return 0
    needed = [s for s in set_names if not feature_sets.is_tuned(s) or study.s.tuned_layer == "best"]
    if study.s.tuned_layer == "untuned" and feature_sets.UNTUNED not in needed:
        needed.insert(0, feature_sets.UNTUNED)
    jobs = search_jobs(study, needed, subjects, hemispheres, rois)
    for job in jobs:
        for hemi in job["hemispheres"]:
            study.search(job["feature_set"], job["subject"], hemi, job["run_dir"])
    return len(jobs)
