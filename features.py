"""Backbones to features: image preparation, batched extraction of AlexNet layers, the on-disk feature cache."""
from __future__ import annotations

import contextlib
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch import nn

import encoding
import models
import outputs
import utils
from models import ALEXNET_LAYERS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM_CACHE: dict = {}  # device -> (scale, shift) of the ImageNet normalisation


def prepare_images(batch_uint8, device, channels_last: bool = False, flip=None) -> torch.Tensor:
    """uint8 N x 3 x S x S (numpy or tensor) -> ImageNet-normalised float32 on device (converted there).

    flip: optional bool per image (tensor or array) for horizontal flips, applied on the device.
    """
    device = torch.device(device)
    x = torch.as_tensor(batch_uint8)
    x = x.to(device, non_blocking=True)
    key = str(device)
    if key not in _NORM_CACHE:  # (x / 255 - mean) / std = x * scale - shift
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        _NORM_CACHE[key] = (1.0 / (255.0 * std), mean / std)
    scale, shift = _NORM_CACHE[key]
    if channels_last:  # reorder the 1-byte pixels; the float ops below keep the memory format
        x = x.contiguous(memory_format=torch.channels_last)
    x = x * scale  # uint8 * float32 -> float32 in one pass
    x.sub_(shift)
    if flip is not None:
        flip = torch.as_tensor(flip, dtype=torch.bool).to(device, non_blocking=True)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def prefetched(fetch, items):
    """Yield (fetch(item), seconds the caller waited), fetching the next item in a background thread."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fetch, items[0])
        for k in range(len(items)):
            t0 = time.perf_counter()
            result = future.result()
            waited = time.perf_counter() - t0
            if k + 1 < len(items):
                future = pool.submit(fetch, items[k + 1])
            yield result, waited


def read_rows(images: np.ndarray, rows: np.ndarray, pin: bool = False) -> torch.Tensor:
    """images[rows] (sorted rows read from the uint8 memmap) as a CPU uint8 tensor, pinned for CUDA copies.

    Inside a DataLoader worker it is written straight into shared memory (handed over without another copy).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
        raise IndexError(f"image rows {rows.min()}..{rows.max()} out of range for {len(images)} images")
    shape = (len(rows),) + tuple(images.shape[1:])
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))  # as default_collate does in workers
        buf = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    elif pin:
        buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    else:
        return torch.from_numpy(np.ascontiguousarray(images[rows]))
    np.take(images, rows, axis=0, out=buf.numpy())
    return buf


_CPU_BF16: list = []


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (avx512_bf16 or amx_bf16); emulated bf16 is slower than float32."""
    if not _CPU_BF16:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        _CPU_BF16.append(bool(flags & {"avx512_bf16", "amx_bf16"}))
    return _CPU_BF16[0]


def autocast_context(device, amp: bool = True, cpu_bf16: bool = True):
    """bfloat16 autocast on CUDA when amp, on CPU when cpu_bf16 and the CPU has bf16 instructions; else a no-op."""
    device = torch.device(device)
    if device.type == "cuda" and amp and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        return positions[order], read_rows(images_uint8, rows[order], pin)

    bar = tqdm(total=len(indices), desc=desc or "extracting features", unit="img", leave=False,
               disable=len(indices) == 0)
    with torch.inference_mode(), autocast_context(device, amp, cpu_bf16=amp):
        for (positions, batch), _ in prefetched(fetch, chunks):
            feats = extractor(prepare_images(batch, device, channels_last))
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
        raise utils.DataError(f"{path}: model checkpoint not found")
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    parts = path.parent.parts[-4:]  # method / subjXX / hemi / roi
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


def layer_features(out_dir, subject: int, spec: str, layers, image_cache, split: dict, split_names,
                   image_size: int, pca_components: int = 1000, seed: int = 0, device=None,
                   batch_size: int = 128, memory_gb: float = 8.0) -> dict:
    """{layer: {split_name: n x d float32}} for one subject's images through one backbone.

    Layers wider than pca_components are reduced by a PCA fitted on the train split only. Results are
    cached under out_dir/features/subjXX/<backbone tag>/ keyed by layer, image size, PCA size and the
    split's image indices; missing layers are extracted together in as few passes as memory allows.
    """
    layers = list(layers)
    cache_dir = Path(out_dir) / "features" / utils.subject_dir_name(subject) / backbone_spec_tag(spec)
    train_hash = _indices_hash(split["train"])

    def file_of(layer, split_name):
        split_hash = _indices_hash(split[split_name])
        return cache_dir / f"{layer}_{image_size}px_pca{pca_components}-{train_hash}_{split_name}-{split_hash}.npy"

    def pca_file(layer):
        return cache_dir / f"{layer}_{image_size}px_pca{pca_components}-{train_hash}_pca.npz"

    out = {layer: {} for layer in layers}
    missing = [(layer, s) for layer in layers for s in split_names if not file_of(layer, s).is_file()]
    for layer, s in [(layer, s) for layer in layers for s in split_names if (layer, s) not in missing]:
        out[layer][s] = np.load(file_of(layer, s))
    if not missing:
        return out

    # A wide layer's PCA is fitted on its train features: extract those too where not cached yet.
    missing += [(layer, "train") for layer in {layer for layer, _ in missing}
                if (layer, "train") not in missing and not file_of(layer, "train").is_file()]
    backbone = load_backbone(spec, device)
    for split_name in ["train"] + sorted({s for _, s in missing} - {"train"}):
        todo = [layer for layer, s in missing if s == split_name]
        if not todo:
            continue
        idx = split[split_name]
        for group in _layer_groups(backbone, todo, image_cache, idx, memory_gb, device):
            raw = extract_features(backbone, image_cache, idx, group, batch_size=batch_size, device=device,
                                          desc=f"{utils.subject_dir_name(subject)} {split_name} features")
            for layer in group:
                feats = raw.pop(layer)
                if feats.shape[1] > pca_components:
                    if split_name == "train":
                        pca = encoding.fit_pca(feats, pca_components, seed)
                        outputs.save_npz(pca_file(layer), {"mean": pca.mean_.astype(np.float32),
                                                         "components": pca.components_.astype(np.float32)},
                                       {"layer": layer, "pca_components": pca_components, "seed": seed},
                                       backbone=spec, subject=subject)
                    pca = np.load(pca_file(layer))
                    feats = (feats - pca["mean"]) @ pca["components"].T
                feats = np.ascontiguousarray(feats, dtype=np.float32)
                outputs.save_npy(file_of(layer, split_name), feats)
                if split_name in split_names:
                    out[layer][split_name] = feats
    return out


def _layer_groups(backbone, layers, image_cache, indices, memory_gb: float, device):
    """Split layers into groups whose raw features fit in memory_gb (one pass over the images per group)."""
    dims = feature_dims(backbone, layers, image_cache.shape[-1])
    groups, current, used = [], [], 0.0
    for layer in layers:
        need = len(indices) * dims[layer] * 4 / 2**30
        if current and used + need > memory_gb:
            groups.append(current)
            current, used = [], 0.0
        current.append(layer)
        used += need
    return groups + ([current] if current else [])
