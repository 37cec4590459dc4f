"""Backbones to features: batched extraction of a backbone's layers and the on-disk feature cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch import nn

import models
import options
import outputs
import paths
import pca
import runtime
import utils
from models import ALEXNET_LAYERS

def feature_dims(backbone: nn.Module, layers=ALEXNET_LAYERS, image_size: int = 224) -> dict[str, int]:
    """Flattened feature size of each layer for image_size inputs (to preallocate feature arrays)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    extractor = create_feature_extractor(backbone, return_nodes={l: l for l in layers}).eval()
    device = next(backbone.parameters()).device
    with torch.inference_mode():
        out = extractor(torch.zeros(1, 3, image_size, image_size, device=device))
    return {l: int(out[l][0].numel()) for l in layers}


def extract_features(backbone: nn.Module, images_uint8: np.ndarray, indices=None, layers=ALEXNET_LAYERS,
                     batch_size: int = 256, device=None, desc: str | None = None, channels_last: bool = True,
                     amp: bool = False, out: dict | None = None) -> dict[str, np.ndarray]:
    """Flattened float32 features (len(indices) x D per layer) of images_uint8[indices] (N x 3 x S x S uint8).

    Rows follow the order of indices (all images if None). out: optional preallocated {layer: array}
    (e.g. np.memmap) to fill instead of allocating. The backbone is run in eval mode under inference_mode.
    """
    from torchvision.models.feature_extraction import create_feature_extractor
    from tqdm import tqdm
    indices = np.arange(len(images_uint8)) if indices is None else np.asarray(indices, dtype=np.int64)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone = backbone.to(device).eval()
    extractor = create_feature_extractor(backbone, return_nodes={l: l for l in layers}).eval()
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    chunks = [np.arange(s, min(s + batch_size, len(indices))) for s in range(0, len(indices), batch_size)]
    pin = device.type == "cuda"

    def fetch(positions):
        rows = indices[positions]
        order = np.argsort(rows, kind="stable")  # sorted reads from the memmap, rows put back in place
        return positions[order], runtime.read_rows(images_uint8, rows[order], pin)

    bar = tqdm(total=len(indices), desc=desc or "extracting features", unit="img", leave=False,
               disable=len(indices) == 0)
    with torch.inference_mode(), runtime.autocast_context(device, amp, cpu_bf16=amp):
        for (positions, batch), _ in runtime.prefetched(fetch, chunks):
            feats = extractor(runtime.prepare_images(batch, device, channels_last))
            for layer in layers:
                values = feats[layer].flatten(1).float().cpu().numpy()
                if out is None:
                    out = {}
                if layer not in out:
                    out[layer] = np.empty((len(indices), values.shape[1]), dtype=np.float32)
                out[layer][positions] = values
            bar.update(len(positions))
    bar.close()
    backbone.train(was_training)
    if out is None:  # no images: empty arrays of the right width
        dims = feature_dims(backbone, layers, images_uint8.shape[-1])
        out = {l: np.empty((0, dims[l]), dtype=np.float32) for l in layers}
    return out


# ---- The feature cache: one cached extractor for untuned and tuned backbones ----


def backbone_spec_tag(spec: str) -> str:
    """A short, readable cache tag for a backbone: 'untuned-<weights>' or '<checkpoint dir>-<hash>'.

    spec is 'untuned:<weights>' or the path of a CL/reg checkpoint (its size and mtime enter the hash,
    so a retrained model never reuses stale features).
    """
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
        raise options.DataError(f"{path}: model checkpoint not found")
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    parts = path.parent.parts[-6:]  # backbone / method / subjXX / hemi / roi / seed (pooled: ... / loso / seed)
    return "-".join(parts + (path.stem, hashlib.sha1(key.encode()).hexdigest()[:8]))


def load_backbone(spec: str, device):
    """The AlexNet a spec names: untuned with its weights, or the tuned backbone of a checkpoint."""
    if spec.startswith("untuned:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # weights=none: the same random init in every stage and process
            return models.build_alexnet(spec.split(":", 1)[1]).to(device).eval()
    return models.load_tuned_backbone(spec, device).eval()


def _indices_hash(indices) -> str:
    return hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:10]


def layer_features(out_dir, subject: int, spec: str, layers, image_sets: dict, image_size: int,
                   pca_components: int = 1000, seed: int = 0, device=None, batch_size: int = 128) -> dict:
    """{layer: {set name: n x d float32}} of image sets (name -> (uint8 N x 3 x S x S images, row indices)).

    Layers wider than pca_components are reduced by a PCA fitted on the 'train' set only (which must be given;
    the fitted PCA is saved, so a set asked for later is projected by the same PCA). Everything missing comes
    from ONE forward pass over the images of the sets that need it; raw activations are streamed to temporary
    files on disk, so memory holds one layer's train activations at a time (for its PCA).
    Cached under out_dir/features/subjXX/<backbone tag>/, keyed by layer, image size, PCA size and row indices.
    """
    layers = list(layers)
    if "train" not in image_sets:
        raise ValueError("layer_features needs a 'train' image set (the PCA is fitted on it)")
    cache_dir = paths.feature_cache_dir(out_dir, subject, backbone_spec_tag(spec))
    train_key = f"{image_size}px_pca{pca_components}-{_indices_hash(image_sets['train'][1])}"

    def file_of(layer, name):
        images, rows = image_sets[name]
        return cache_dir / f"{layer}_{train_key}_{name}{len(images)}-{_indices_hash(rows)}.npy"

    def pca_file(layer):
        return cache_dir / f"{layer}_{train_key}_pca.npz"

    todo = {}  # layer -> the sets to extract (every set when the layer's train features or PCA must be made)
    for layer in layers:
        missing = [name for name in image_sets if not file_of(layer, name).is_file()]
        if missing:
            # cached train features come with their saved PCA (saved first) when the layer is wide
            todo[layer] = missing if file_of(layer, "train").is_file() else list(image_sets)
    if todo:
        _extract_and_reduce(spec, todo, image_sets, cache_dir, file_of, pca_file, pca_components, seed, device,
                            batch_size, f"{paths.subject_dir_name(subject)} {Path(spec).parent.name or spec}")
    return {layer: {name: _load_cached(file_of(layer, name)) for name in image_sets} for layer in layers}


def _load_cached(path) -> np.ndarray:
    return np.load(path)


def _extract_and_reduce(spec, todo: dict, image_sets, cache_dir, file_of, pca_file, pca_components, seed, device,
                        batch_size, desc):
    """One pass over the images of the sets in todo (layer -> set names) for their layers (raw activations to
    temporary .npy files), then each wide layer's PCA (fitted on train, or the saved one) applied."""
    backbone = load_backbone(spec, device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = {}
    try:
        for name, (images, rows) in image_sets.items():
            layers = [layer for layer, names in todo.items() if name in names]
            if not layers:
                continue
            dims = feature_dims(backbone, layers, images.shape[-1])
            raw[name] = {layer: np.lib.format.open_memmap(
                cache_dir / f".{layer}_{name}_raw.tmp.npy", mode="w+", dtype=np.float32,
                shape=(len(rows), dims[layer])) for layer in layers}
            extract_features(backbone, images, rows, layers, batch_size=batch_size, device=device,
                             desc=f"{desc} {name} features", out=raw[name])
        for layer, names in todo.items():
            width = raw[names[0]][layer].shape[1]
            fitted, train_scores = None, None
            if width > pca_components:
                if "train" in names:  # fitted on an in-memory copy (centred in place), its train scores with it
                    fitted, train_scores = pca.fit_transform(np.array(raw["train"][layer]), pca_components, seed,
                                                             device, overwrite_x=True)
                    _save_pca(pca_file(layer), fitted, {"pca_components": pca_components, "seed": seed}, spec)
                else:
                    fitted = pca.from_arrays(np.load(pca_file(layer)))
            for name in names:
                feats = raw[name][layer]
                if name == "train" and train_scores is not None:
                    feats, train_scores = train_scores, None
                elif fitted is not None:  # the fitted PCA's own transform, in row chunks
                    feats = np.concatenate([fitted.transform(feats[i:i + 4096]) for i in range(0, len(feats), 4096)]
                                           or [np.empty((0, fitted.n_components_), dtype=np.float32)])
                outputs.save_npy(file_of(layer, name), np.ascontiguousarray(feats, dtype=np.float32))
                path = Path(raw[name].pop(layer).filename)  # free the disk as soon as a layer is done
                path.unlink(missing_ok=True)
    finally:
        for name in raw:
            for layer in list(raw[name]):
                Path(raw[name].pop(layer).filename).unlink(missing_ok=True)


def _save_pca(path, fitted, options: dict, spec: str) -> None:
    """A fitted PCA's arrays, uncompressed (zlib gains little on float32 components and took 30 s at full size)."""
    outputs.atomic_write(path, lambda f: np.savez(f, **pca.arrays(fitted)), suffix=".tmp.npz")
    outputs.write_sidecar(path, options, backbone=spec)


def subject_image_sets(subject_data: utils.Subject, splits=utils.SPLIT_NAMES, challenge_images=None) -> dict:
    """The image sets of one subject for layer_features: its train/val/test rows (+ the challenge test images)."""
    sets = {name: (subject_data.images, subject_data.split[name]) for name in splits}
    if challenge_images is not None:
        sets["challenge"] = (challenge_images, np.arange(len(challenge_images)))
    return sets


def drop_cached_layers(out_dir, subject: int, spec: str, keep) -> None:
    """Delete a backbone's cached features except the kept layers (a tuned search needs only its chosen one)."""
    cache_dir = paths.feature_cache_dir(out_dir, subject, backbone_spec_tag(spec))
    for path in cache_dir.glob("*.npy*") if cache_dir.is_dir() else ():
        if path.name.split("_", 1)[0] not in keep and not path.name.endswith((".tmp.npy",)):
            path.unlink(missing_ok=True)
