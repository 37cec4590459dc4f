"""Backbones to features: batched extraction of a backbone's layers, external feature sets, the on-disk cache."""
from __future__ import annotations

import contextlib
import gc
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch import nn

import backbones
import feature_sets
import models
import options
import outputs
import paths
import pca
import runtime
import utils
from backbones import ALEXNET_LAYERS


COLLECT_ABOVE_PARAMS = 5_000_000  # feature_extractor: networks this large are freed from the tracer's cycles at once
_FROZEN: list = []                # whether this process's older objects were moved out of the collector's view


@contextlib.contextmanager
def feature_extractor(net: nn.Module, layers):
    """Context: a module whose forward returns {layer: activations} for the layers (torchvision's fx extractor,
    with timm's untraceable modules kept whole); spatial and token outputs are returned as they are.

    Tracing leaves reference cycles that hold the network, and Python's collector, triggered by allocation counts,
    ran so rarely that a process reading one network after another (searches, results, predictions) held ~30 dead
    AlexNets (8 GB, measured). So for a large network the collector runs on exit; the objects alive before the
    first such extractor (libraries, data: ~460,000) are frozen first (gc.freeze), which makes each run ~0.2 s
    cheaper. Small networks (tests) skip both."""
    from torchvision.models.feature_extraction import create_feature_extractor
    layers = backbones.check_layers(net, layers)
    large = sum(p.numel() for p in net.parameters()) > COLLECT_ABOVE_PARAMS
    if large and not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN.append(True)
    extractor = create_feature_extractor(net, return_nodes={layer: layer for layer in layers},
                                         tracer_kwargs=backbones.tracer_kwargs(net) or None)
    try:
        yield extractor
    finally:  # the extractor (its graphs hold it in cycles too) lets go of the network's modules and tensors
        for table in (extractor._modules, extractor._parameters, extractor._buffers):
            table.clear()
        if large:
            gc.collect()


def feature_dims(backbone: nn.Module, layers=ALEXNET_LAYERS, image_size: int = 224) -> dict[str, int]:
    """Flattened feature size of each layer for image_size inputs (to preallocate feature arrays)."""
    device = next(backbone.parameters()).device
    with feature_extractor(backbone, layers) as extractor, torch.inference_mode():
        out = extractor.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    return {l: int(out[l][0].numel()) for l in layers}


def extract_features(backbone: nn.Module, images_uint8: np.ndarray, indices=None, layers=ALEXNET_LAYERS,
                     batch_size: int = 256, device=None, desc: str | None = None, channels_last: bool = True,
                     amp: bool = False, out: dict | None = None) -> dict[str, np.ndarray]:
    """Flattened float32 features (len(indices) x D per layer) of images_uint8[indices] (N x 3 x S x S uint8).

    Rows follow the order of indices (all images if None). out: optional preallocated {layer: array}
    (e.g. np.memmap) to fill instead of allocating. The backbone is run in eval mode under inference_mode.
    """
    indices = np.arange(len(images_uint8)) if indices is None else np.asarray(indices, dtype=np.int64)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone = backbone.to(device).eval()
    with feature_extractor(backbone, layers) as extractor:
        out = _extract(extractor.eval(), backbone, images_uint8, indices, layers, batch_size, device, desc,
                       channels_last, amp, out)
    backbone.train(was_training)
    if out is None:  # no images: empty arrays of the right width
        dims = feature_dims(backbone, layers, images_uint8.shape[-1])
        out = {l: np.empty((0, dims[l]), dtype=np.float32) for l in layers}
    return out


def _extract(extractor, backbone, images_uint8, indices, layers, batch_size, device, desc, channels_last, amp, out):
    """extract_features' loop over batches with an open extractor."""
    from tqdm import tqdm
    mean, std = models.normalisation(backbone)
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
            feats = extractor(runtime.prepare_images(batch, device, channels_last, None, mean, std))
            for layer in layers:
                values = feats[layer].flatten(1).float().cpu().numpy()
                if out is None:
                    out = {}
                if layer not in out:
                    out[layer] = np.empty((len(indices), values.shape[1]), dtype=np.float32)
                out[layer][positions] = values
            bar.update(len(positions))
    bar.close()
    return out


# ---- The feature cache: one cached extractor for untuned and tuned backbones and external sets ----


def untuned_spec(backbone: str, weights) -> str:
    """'untuned:<backbone>:<weights>' (both canonical: DEFAULT resolved for torchvision, so either spelling is one)."""
    name = backbones.parse(backbone).name
    return f"untuned:{name}:{models.weights_name(name, weights)}"


def parse_untuned(spec: str) -> tuple[str, str]:
    """'untuned:<backbone>:<weights>' -> (backbone, weights); 'untuned:<weights>' (before backbones) is AlexNet's."""
    body = spec[len("untuned:"):]
    backbone, _, weights = body.rpartition(":")
    return backbone or "alexnet", weights


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def backbone_spec_tag(spec: str, features_dir=None, subject: int | None = None) -> str:
    """A short, readable cache tag: 'untuned-[<backbone>-]<weights>-<hash>' (AlexNet's without the backbone, as
    before backbones), '<checkpoint dir>-<hash>', or 'external-<name>-<hash>' (of its files: size and mtime).

    spec is an untuned_spec, the path of a CL/reg checkpoint (its size and mtime enter the hash, so a retrained
    model never reuses stale features), or 'external:<name>' (with features_dir and the subject).
    """
    if spec.startswith("untuned:"):
        backbone, weights = parse_untuned(spec)
        key = _file_key(Path(weights)) if Path(weights).is_file() else weights
        name = Path(weights).stem if Path(weights).suffix else weights
        prefix = "" if backbone == "alexnet" else f"{paths.backbone_dir_name(backbone)}-"
        return f"untuned-{prefix}{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if feature_sets.is_external(spec):
        folder = external_dir(features_dir, subject, spec)
        key = ";".join(_file_key(f) for f in sorted(folder.glob("*.npy")))
        return f"external-{feature_sets.external_name(spec)}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    path = Path(spec)
    if not path.is_file():
        raise options.DataError(f"{path}: model checkpoint not found")
    parts = path.parent.parts[-6:]  # backbone / method / subjXX / hemi / roi / seed (pooled: ... / loso / seed)
    return "-".join(parts + (path.stem, hashlib.sha1(_file_key(path).encode()).hexdigest()[:8]))


def load_backbone(spec: str, device, backbone: str | None = None):
    """The network a spec names: untuned with its weights (weights none: the same seeded init in every stage and
    process), or the tuned backbone of a checkpoint (backbone: refuse one trained with another backbone)."""
    if spec.startswith("untuned:"):
        name, weights = parse_untuned(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return models.roi_backbone(name, weights, dropout=None).to(device).eval()
    return models.load_tuned_backbone(spec, device, backbone).eval()


def spec_backbone(spec: str) -> str:
    """The backbone name of an untuned spec or a checkpoint."""
    return parse_untuned(spec)[0] if spec.startswith("untuned:") else models.checkpoint_backbone(spec)


def raw_widths(spec: str, layers, image_size: int, features_dir=None, subject: int | None = None) -> dict:
    """{layer: features before any PCA} of a backbone spec at image_size (traced on the meta device: no weights,
    no compute) or of an external set's train files."""
    if feature_sets.is_external(spec):
        folder = external_dir(features_dir, subject, spec)
        return {layer: int(np.load(folder / f"train_{layer}.npy", mmap_mode="r").shape[1]) for layer in layers}
    return feature_dims(models.weightless_backbone(spec_backbone(spec)), list(layers), image_size)


# ---- External feature sets: features_dir/subjXX/<name>/{train,challenge}_<layer>.npy ----

EXTERNAL_FILES = "features_dir/subjXX/<name>/{train,challenge}_<layer>.npy"


def external_dir(features_dir, subject: int, feature_set: str) -> Path:
    """features_dir/subjXX/<name> of an external set."""
    if not features_dir:
        raise options.OptionsError(f"{feature_set}: an external feature set needs --features_dir ({EXTERNAL_FILES})")
    return Path(features_dir) / paths.subject_dir_name(subject) / feature_sets.external_name(feature_set)


def external_layers(features_dir, subject: int, feature_set: str) -> list[str]:
    """The layers of an external set on a subject: its train_<layer>.npy files, in natural order (layer2 < layer10)."""
    import re
    folder = external_dir(features_dir, subject, feature_set)
    layers = [f.name[len("train_"):-len(".npy")] for f in folder.glob("train_*.npy")] if folder.is_dir() else []
    if not layers:
        raise options.DataError(f"{folder}: no train_<layer>.npy files for {feature_set}; expected {EXTERNAL_FILES}, "
                                "one row per training image in fMRI row order")
    return sorted(layers, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def read_external(path: Path, n_rows: int, what: str) -> np.ndarray:
    """An external feature file, memory-mapped, after checks (2-D, float16/32, n_rows rows, finite); one-line
    DataErrors naming the file."""
    if not path.is_file():
        raise options.DataError(f"{path}: not found; expected {EXTERNAL_FILES} ({what})")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise options.DataError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from None
    if array.ndim != 2:
        raise options.DataError(f"{path}: shape {array.shape}; expected 2-D (images x features)")
    if array.dtype not in (np.float16, np.float32):
        raise options.DataError(f"{path}: dtype {array.dtype}; expected float16 or float32")
    if len(array) != n_rows:
        raise options.DataError(f"{path}: {len(array)} rows; expected {n_rows}, one per {what}")
    for start in range(0, n_rows, 1024):  # a block at a time: the file may not fit in memory
        block = np.asarray(array[start:start + 1024])
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
            raise options.DataError(f"{path}: non-finite values (NaN or inf), first in row {bad}; expected finite "
                                    "features")
    return array


def _indices_hash(indices) -> str:
    return hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:10]


def layer_features(out_dir, subject: int, spec: str, layers, image_sets: dict, image_size: int,
                   pca_components: int = 1000, seed: int = 0, device=None, batch_size: int = 128,
                   features_dir=None) -> dict:
    """{layer: {set name: n x d float32}} of image sets (name -> (uint8 N x 3 x S x S images, row indices)).

    Layers wider than pca_components are reduced by a PCA fitted on the 'train' set only (which must be given;
    the fitted PCA is saved, so a set asked for later is projected by the same PCA). Everything missing comes
    from ONE forward pass over the images of the sets that need it; raw activations are streamed to temporary
    files on disk, so memory holds one layer's train activations at a time (for its PCA).
    Cached under out_dir/features/subjXX/<backbone tag>/, keyed by layer, image size, PCA size and row indices.
    An external set (spec 'external:<name>') reads its rows from features_dir instead of running a backbone.
    """
    layers = list(layers)
    if "train" not in image_sets:
        raise ValueError("layer_features needs a 'train' image set (the PCA is fitted on it)")
    cache_dir = paths.feature_cache_dir(out_dir, subject, backbone_spec_tag(spec, features_dir, subject))
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
    if todo and feature_sets.is_external(spec):
        _read_and_reduce(spec, todo, image_sets, cache_dir, file_of, pca_file, pca_components, seed, device,
                         external_dir(features_dir, subject, spec))
    elif todo:
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
    raw, dims_at = {}, {}  # dims_at: image size -> every todo layer's width (traced once, not once per set)
    try:
        for name, (images, rows) in image_sets.items():
            layers = [layer for layer, names in todo.items() if name in names]
            if not layers:
                continue
            if images.shape[-1] not in dims_at:
                dims_at[images.shape[-1]] = feature_dims(backbone, list(todo), images.shape[-1])
            dims = dims_at[images.shape[-1]]
            raw[name] = {layer: np.lib.format.open_memmap(
                cache_dir / f".{layer}_{name}_raw.tmp.npy", mode="w+", dtype=np.float32,
                shape=(len(rows), dims[layer])) for layer in layers}
            extract_features(backbone, images, rows, layers, batch_size=batch_size, device=device,
                             desc=f"{desc} {name} features", out=raw[name])
        for layer, names in todo.items():
            def drop_raw(name, layer=layer):  # free the disk as soon as a layer's set is done
                Path(raw[name].pop(layer).filename).unlink(missing_ok=True)
            _reduce_and_save(layer, names, lambda name, layer=layer: raw[name][layer], raw[names[0]][layer].shape[1],
                             file_of, pca_file, pca_components, seed, device, spec, done=drop_raw)
    finally:
        for name in raw:
            for layer in list(raw[name]):
                Path(raw[name].pop(layer).filename).unlink(missing_ok=True)


def _read_and_reduce(spec, todo: dict, image_sets, cache_dir, file_of, pca_file, pca_components, seed, device,
                     folder: Path):
    """External features: each layer's rows of the sets in todo from its checked files (the challenge set from
    challenge_<layer>.npy, the others from train_<layer>.npy), reduced as _extract_and_reduce reduces activations."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for layer, names in todo.items():
        files = {}
        for kind in {"challenge" if name == "challenge" else "train" for name in names}:
            n_images = len(image_sets["challenge" if kind == "challenge" else "train"][0])
            files[kind] = read_external(folder / f"{kind}_{layer}.npy", n_images, "challenge test image, in file "
                                        "order" if kind == "challenge" else "training image, in fMRI row order")

        def rows_of(name):
            array = files["challenge" if name == "challenge" else "train"]
            return np.asarray(array[np.asarray(image_sets[name][1], dtype=np.int64)], dtype=np.float32)

        _reduce_and_save(layer, names, rows_of, next(iter(files.values())).shape[1], file_of, pca_file,
                         pca_components, seed, device, spec)


def _reduce_and_save(layer, names, rows_of, width: int, file_of, pca_file, pca_components, seed, device, spec,
                     done=None):
    """One layer's features of each set in names (rows_of(name)) to the cache, reduced when wider than
    pca_components by the PCA of the train rows (fitted now, with its train scores, and saved; or the saved one)."""
    fitted, train_scores = None, None
    if width > pca_components:
        if "train" in names:  # fitted on an in-memory copy (centred in place), its train scores with it
            train = rows_of("train")
            train = np.array(train, dtype=np.float32) if isinstance(train, np.memmap) else train
            fitted, train_scores = pca.fit_transform(train, pca_components, seed, device, overwrite_x=True)
            del train
            _save_pca(pca_file(layer), fitted, {"pca_components": pca_components, "seed": seed}, spec)
        else:
            fitted = pca.from_arrays(np.load(pca_file(layer)))
    for name in names:
        if name == "train" and train_scores is not None:
            feats, train_scores = train_scores, None
        else:
            feats = rows_of(name)
            if fitted is not None:  # the fitted PCA's own transform, in row chunks
                feats = np.concatenate([fitted.transform(feats[i:i + 4096]) for i in range(0, len(feats), 4096)]
                                       or [np.empty((0, fitted.n_components_), dtype=np.float32)])
        outputs.save_npy(file_of(layer, name), np.ascontiguousarray(feats, dtype=np.float32))
        if done is not None:
            done(name)


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
    """Delete a backbone's cached features and PCAs except the kept layers' (a tuned search needs only its chosen
    one; the other PCAs, up to 260 MB each for AlexNet at full size, would hold ~0.8 GB per tuned model)."""
    cache_dir = paths.feature_cache_dir(out_dir, subject, backbone_spec_tag(spec))
    for path in [*cache_dir.glob("*.npy"), *cache_dir.glob("*.npz")] if cache_dir.is_dir() else ():
        if not any(path.name.startswith(f"{layer}_") for layer in keep) and not path.name.startswith("."):
            path.unlink(missing_ok=True)  # (layer names may hold '_': matched by prefix)
            outputs.sidecar_path(path).unlink(missing_ok=True)
