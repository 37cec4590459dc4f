"""AlexNet backbones, the contrastive (CL) and regression (reg) ROI models, batched feature extraction,
checkpoints, torch.distributed helpers and the one training loop shared by every training script."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import utils

ALEXNET_LAYERS = ("features.2", "features.5", "features.7", "features.9", "features.12",
                  "classifier.2", "classifier.5", "classifier.6")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METHODS = ("cl", "reg")
MIN_ROI_VOXELS = 20          # smaller ROIs give a degenerate head (h = 0.8 V, z = 0.2 V) and noisy targets
CHECKPOINT_FORMAT = "roi_model_v1"
VAL_METRIC = {"cl": "val_top1", "reg": "val_r"}  # top-1 fMRI->image retrieval; mean voxel Pearson r


# ---------------------------------------------------------------------------------------------
# Backbone and image preparation.
# ---------------------------------------------------------------------------------------------


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Set the probability of every nn.Dropout in model (AlexNet's classifier has two, p=0.5 by default)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
    return model


def build_alexnet(weights: str = "IMAGENET1K_V1") -> nn.Module:
    """torchvision AlexNet: 'IMAGENET1K_V1' (torchvision download/cache), 'none' (random init), or a .pth path."""
    import torchvision
    from urllib.error import URLError
    if weights is None or str(weights).lower() in ("none", ""):
        return torchvision.models.alexnet(weights=None)
    if str(weights) == "IMAGENET1K_V1":
        try:
            return torchvision.models.alexnet(weights="IMAGENET1K_V1")
        except (URLError, OSError, RuntimeError, EOFError) as err:
            raise utils.DataError(
                f"AlexNet IMAGENET1K_V1 weights could not be fetched ({type(err).__name__}: {err}); "
                f"torchvision caches them under {Path(torch.hub.get_dir()) / 'checkpoints'}: copy "
                "alexnet-owt-7be5be79.pth there, or pass --weights=/path/to/alexnet.pth (a local state dict), "
                "or --weights=none for a random init") from None
    path = Path(weights)
    if not path.is_file():
        raise utils.DataError(f"{path}: weights file not found; expected 'IMAGENET1K_V1', 'none' or a .pth "
                              "AlexNet state dict")
    model = torchvision.models.alexnet(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, OSError) as err:
        raise utils.DataError(f"{path}: not an AlexNet state dict ({type(err).__name__}: "
                              f"{str(err).splitlines()[0]})") from None
    return model


_NORM_CACHE: dict = {}


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
    """images[rows] (sorted rows read from the uint8 memmap) as a CPU uint8 tensor, pinned for CUDA copies."""
    if pin:
        buf = torch.empty((len(rows),) + tuple(images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        np.take(images, rows, axis=0, out=buf.numpy(), mode="clip")
        return buf
    return torch.from_numpy(np.ascontiguousarray(images[rows]))


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


# ---------------------------------------------------------------------------------------------
# The ROI models and the contrastive loss.
# ---------------------------------------------------------------------------------------------


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) -> float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (each rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class DistBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every rank under torch.distributed (CPU/gloo and GPU alike).

    Unlike nn.SyncBatchNorm (GPU only) it all-reduces sums with autograd, so DDP gradients equal the
    single-process gradient on the global batch. Outside torch.distributed it is BatchNorm1d.
    """

    def forward(self, x):
        if not (self.training and _dist_world() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = _upcast(x)
        count = torch.tensor([float(x.shape[0])], device=x.device, dtype=xf.dtype)
        dist.all_reduce(count)
        mean = all_reduce(xf.sum(0)) / count
        var = all_reduce(((xf - mean) ** 2).sum(0)) / count  # two passes: stabler than E[x^2] - mean^2
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1).clamp(min=1))
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class CLModel(nn.Module):
    """Paper CL model: AlexNet (1000 outputs) -> image projection, fMRI projection, one shared MLP head."""

    def __init__(self, n_voxels: int, weights: str = "IMAGENET1K_V1", dropout: float = 0.5):
        super().__init__()
        self.n_voxels = int(n_voxels)
        self.hidden = int(0.8 * n_voxels)
        self.embed_dim = int(0.2 * n_voxels)
        self.backbone = set_dropout(build_alexnet(weights), dropout)
        self.image_proj = nn.Linear(1000, self.hidden, bias=False)
        self.fmri_proj = nn.Linear(self.n_voxels, self.hidden, bias=False)
        h, z = self.hidden, self.embed_dim
        self.head = nn.Sequential(nn.Linear(h, h), DistBatchNorm1d(h), nn.ReLU(inplace=True),
                                  nn.Linear(h, h), DistBatchNorm1d(h), nn.ReLU(inplace=True),
                                  nn.Linear(h, z))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_proj(self.backbone(images)))

    def embed_fmri(self, fmri: torch.Tensor) -> torch.Tensor:
        return self.head(self.fmri_proj(fmri))

    def forward(self, images: torch.Tensor, fmri: torch.Tensor):
        """-> (fmri embeddings, image embeddings), both batch x z."""
        return self.embed_fmri(fmri), self.embed_images(images)


class RegModel(nn.Module):
    """Regression baseline: AlexNet (1000 outputs) -> Linear(1000 -> voxels), trained with MSE."""

    def __init__(self, n_voxels: int, weights: str = "IMAGENET1K_V1", dropout: float = 0.5):
        super().__init__()
        self.n_voxels = int(n_voxels)
        self.backbone = set_dropout(build_alexnet(weights), dropout)
        self.readout = nn.Linear(1000, self.n_voxels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.backbone(images))


def build_model(method: str, n_voxels: int, weights: str = "IMAGENET1K_V1", dropout: float = 0.5) -> nn.Module:
    """CLModel for 'cl', RegModel for 'reg' (seed torch first for a reproducible init)."""
    check_method(method)
    return (CLModel if method == "cl" else RegModel)(n_voxels, weights, dropout)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise utils.DataError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def contrastive_loss(fmri_emb: torch.Tensor, img_emb: torch.Tensor, temperature: float = 0.3,
                     symmetric: bool = False) -> torch.Tensor:
    """Paper loss: s_ij = cos(fMRI i, image j); mean over images j of -log(exp(s_jj/t) / sum_i exp(s_ij/t)).

    symmetric=True averages it with the fMRI direction (softmax over images), as in CLIP.
    """
    f = F.normalize(_upcast(fmri_emb), dim=1)
    g = F.normalize(_upcast(img_emb), dim=1)
    logits = f @ g.T / temperature                       # logits[i, j] = s_ij / t
    target = torch.arange(len(f), device=f.device)
    loss = F.cross_entropy(logits.T, target)             # row j: image j against every fMRI i
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits, target))
    return loss


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of x in rank order (sizes may differ); this rank's slice keeps its graph.

    Other ranks' slices are constants here; their gradients are computed on their own ranks (open_clip style).
    """
    world = _dist_world()
    if world == 1:
        return x
    rank = dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.detach()
    if x.shape[0] < max(sizes):
        padded = torch.cat([padded, padded.new_zeros((max(sizes) - x.shape[0],) + tuple(x.shape[1:]))])
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded.contiguous())
    parts = [b[:s] for b, s in zip(buffers, sizes)]
    parts[rank] = x
    return torch.cat(parts)


def batch_loss(method: str, model: nn.Module, images: torch.Tensor, fmri: torch.Tensor,
               temperature: float = 0.3, symmetric: bool = False):
    """Loss of one global batch from this rank's shard -> (tensor to backpropagate, global loss value).

    Under DDP (which averages gradients over ranks) the backpropagated tensor is scaled so the averaged
    gradient equals the single-process gradient on the whole global batch:
    CL: every rank computes the full global-batch loss with gradients through its own rows, times world size;
    reg: this rank's squared errors over the global element count, times world size.
    """
    world = _dist_world()
    if method == "cl":
        fmri_emb, img_emb = model(images, fmri)
        loss = contrastive_loss(gather_rows(fmri_emb), gather_rows(img_emb), temperature, symmetric)
        return loss * world, loss.detach()
    pred = _upcast(model(images))
    sse = ((pred - fmri) ** 2).sum()
    stats = torch.stack([sse.detach(), torch.tensor(float(pred.numel()), device=pred.device, dtype=sse.dtype)])
    if world > 1:
        dist.all_reduce(stats)
    return sse / stats[1] * world, stats[0] / stats[1]


# ---------------------------------------------------------------------------------------------
# Runtime: device, threads and torch.distributed (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK).
# ---------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds caches), the other ranks after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str = "auto", num_threads: int = 0) -> Runtime:
    """Pick the device ('auto' = cuda if present) and join torch.distributed when launched by torchrun."""
    if num_threads and num_threads > 0:
        torch.set_num_threads(int(num_threads))
    dev = utils.resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return Runtime(dev, rank, world, local_rank)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one format (plain types and tensors, loadable with weights_only=True).
# ---------------------------------------------------------------------------------------------


def checkpoint_path(out_dir, method: str, subject: int, hemi: str, roi: str, which: str = "best") -> Path:
    """out_dir/models/{method}/subjXX/{hemi}/{roi}/{which}.pt ('best' = lowest val loss, 'last' = for resuming)."""
    if which not in ("best", "last"):
        raise ValueError(f"which={which!r}: expected 'best' or 'last'")
    return Path(out_dir) / "models" / check_method(method) / utils.subject_dir_name(subject) / hemi / roi / f"{which}.pt"


def _plain(obj):
    """Options / metrics as JSON-able python types (weights_only=True refuses numpy scalars and Paths)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic)
                                 else o.tolist() if isinstance(o, np.ndarray) else str(o)))


def save_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, epoch: int = 0, options: dict | None = None,
                    roi_voxel_indices=None, metrics: list | None = None, **extra) -> Path:
    """Atomically torch.save {model, optimizer, scheduler, epoch, options, roi_voxel_indices, metrics, rng, ...}."""
    model = getattr(model, "module", model)  # unwrap DDP
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_class": type(model).__name__,
        "n_voxels": int(getattr(model, "n_voxels", 0)),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "options": _plain(options or {}),
        "roi_voxel_indices": torch.as_tensor(np.asarray(roi_voxel_indices if roi_voxel_indices is not None else [],
                                                        dtype=np.int64)),
        "metrics": _plain(metrics or []),
        "rng": {"torch": torch.get_rng_state()},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = _plain(scheduler.state_dict())
    ckpt.update(_plain(extra))
    return utils.atomic_write(path, lambda fh: torch.save(ckpt, fh), suffix=".tmp.pt")


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) of a checkpoint written by save_checkpoint, or a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise utils.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise utils.DataError(f"{path}: unreadable checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise utils.DataError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (written by models.save_checkpoint)")
    return ckpt


def load_roi_model(path, device="cpu") -> nn.Module:
    """The whole tuned CL or reg model of a checkpoint (eval mode)."""
    ckpt = load_checkpoint(path)
    method = {"CLModel": "cl", "RegModel": "reg"}.get(ckpt["model_class"])
    if method is None:
        raise utils.DataError(f"{path}: unknown model class {ckpt['model_class']!r}")
    model = build_model(method, ckpt["n_voxels"], weights="none")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_tuned_backbone(path, device="cpu") -> nn.Module:
    """The fine-tuned AlexNet of a CL or reg checkpoint (eval mode), for feature extraction."""
    ckpt = load_checkpoint(path)
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if not state:
        raise utils.DataError(f"{path}: checkpoint holds no backbone weights")
    backbone = build_alexnet("none")
    backbone.load_state_dict(state)
    return backbone.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Data for training: one subject's image cache, split and fMRI, loaded once.
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    subject: int
    images: np.ndarray                   # N x 3 x S x S uint8 memmap (image cache)
    split: dict                          # 'train' / 'val' / 'test' row indices (test is never read here)
    fmri: dict                           # hemi -> N x V float32 (memmap, or in RAM for sweeps)
    voxel_indices: dict = field(default_factory=dict)  # hemi -> {roi: vertex indices}


def load_training_data(data_dir, out_dir, subject: int, image_size: int = 224, split_seed: int = 0,
                       hemispheres=utils.HEMISPHERES, check_values: bool = True, fmri_in_ram: bool = False,
                       runtime: Runtime | None = None) -> TrainingData:
    """Validate the subject, then get its split, image cache, fMRI and ROI indices (rank 0 builds caches first)."""
    runtime = runtime or Runtime(torch.device("cpu"))
    for hemi in hemispheres:
        check_hemisphere(hemi)
    with runtime.main_first():
        paths = utils.find_subject(data_dir, subject)
        info = utils.validate_subject(paths, check_values)
        split = utils.get_split(out_dir, subject, info["images"], seed=split_seed)
        images = utils.load_image_cache(out_dir, subject, info["images"], size=image_size)
    fmri, voxel_indices = {}, {}
    for hemi in hemispheres:
        fmri[hemi] = np.array(utils.load_fmri(paths, hemi)) if fmri_in_ram else utils.load_fmri(paths, hemi)
        voxel_indices[hemi] = utils.roi_voxel_indices(paths, hemi, info["n_vertices"][hemi])
    return TrainingData(subject, images, split, fmri, voxel_indices)


def check_hemisphere(hemi: str) -> str:
    if hemi not in utils.HEMISPHERES:
        raise utils.DataError(f"hemisphere {hemi!r}: expected one of {', '.join(utils.HEMISPHERES)}")
    return hemi


def roi_fmri(data: TrainingData, hemi: str, roi: str):
    """-> (N x V float32 fMRI of the ROI in RAM, its vertex indices); DataError when under MIN_ROI_VOXELS."""
    (roi,) = utils.check_roi_names([roi])
    idx = data.voxel_indices[hemi][roi]
    if len(idx) < MIN_ROI_VOXELS:
        raise utils.DataError(f"subject {data.subject} {hemi} {roi}: {len(idx)} voxels; training needs at least "
                              f"{MIN_ROI_VOXELS} (some ROIs are empty for some subjects)")
    return np.ascontiguousarray(data.fmri[hemi][:, idx], dtype=np.float32), idx


# ---------------------------------------------------------------------------------------------
# Training: one loop for CL and reg, single process or DDP, exact resume.
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Training hyper-parameters (script options of the same names override them)."""
    epochs: int = 30
    batch_size: int = 1024            # global batch, split over ranks under torchrun
    lr: float = 1e-4
    temperature: float = 0.3          # CL only
    symmetric_loss: bool = False      # CL only
    lr_patience: int = 3              # ReduceLROnPlateau on val loss
    lr_factor: float = 0.1
    weights: str = "IMAGENET1K_V1"
    dropout: float = 0.5              # AlexNet classifier dropout (torchvision default)
    seed: int = 0
    amp: bool = True                  # bfloat16 autocast on GPU
    cpu_bf16: bool = True             # bfloat16 autocast on CPUs with bf16 instructions (~1.6x; float32 elsewhere)
    channels_last: bool = True        # measured faster on CPU for training and inference
    hflip: bool = False
    resume: bool = False
    stop_after_epoch: int = 0         # 0 = train all epochs
    slim_finished: bool = True        # drop optimizer state from last.pt once done

    @classmethod
    def from_options(cls, options: dict) -> "TrainSettings":
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


# settings that must match to resume a run (epochs may grow; speed settings may change)
_RESUME_KEYS = ("batch_size", "lr", "temperature", "symmetric_loss", "lr_patience", "lr_factor", "weights",
                "dropout", "seed", "hflip")


def epoch_batches(indices, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Epoch's batches from (seed, epoch) alone: a permutation cut into ceil(n / batch_size) near-equal, sorted batches.

    Near-equal batches (no small remainder batch) keep every contrastive batch large and BatchNorm well defined.
    """
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(indices, dtype=np.int64))
    n_batches = max(1, math.ceil(len(order) / batch_size))
    return [np.sort(b) for b in np.array_split(order, n_batches)]


def _epoch_torch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed for dropout in one epoch on one rank, so a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _flips(n_images: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).random(n_images) < 0.5


def _shard(rows: np.ndarray, runtime: Runtime) -> np.ndarray:
    return np.array_split(rows, runtime.world_size)[runtime.rank]


@torch.no_grad()
def evaluate(method: str, model: nn.Module, images: np.ndarray, fmri_t: torch.Tensor, indices: np.ndarray,
             settings: TrainSettings, runtime: Runtime) -> dict:
    """Val loss and quality (CL: top-1 fMRI->image retrieval among these images; reg: mean voxel Pearson r)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = runtime.device
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    mine = _shard(indices, runtime)
    chunks = [mine[s:s + settings.batch_size] for s in range(0, len(mine), settings.batch_size)]
    pin = device.type == "cuda"
    outputs = []
    with autocast_context(device, settings.amp, settings.cpu_bf16):
        for (rows, batch), _ in prefetched(lambda r: (r, read_rows(images, r, pin)), chunks):
            x = prepare_images(batch, device, settings.channels_last)
            rows_t = torch.as_tensor(rows, device=device)
            if method == "cl":
                f, g = model(x, fmri_t[rows_t])
                outputs.append(torch.cat([f.float(), g.float()], 1))
            else:
                outputs.append(model(x).float())
    width = (2 * model.embed_dim) if method == "cl" else model.n_voxels
    local = torch.cat(outputs) if outputs else torch.zeros(0, width, device=device)
    every = gather_rows(local)
    target = fmri_t[torch.as_tensor(indices, device=device)]
    model.train(was_training)
    if method == "cl":
        f, g = every[:, :model.embed_dim], every[:, model.embed_dim:]
        # the loss over val batches like the training batches (negatives within a batch)
        batches = np.array_split(np.arange(len(indices)), max(1, math.ceil(len(indices) / settings.batch_size)))
        loss = sum(len(b) * contrastive_loss(f[b], g[b], settings.temperature, settings.symmetric_loss).item()
                   for b in batches) / len(indices)
        sim = F.normalize(f, dim=1) @ F.normalize(g, dim=1).T
        top1 = (sim.argmax(1) == torch.arange(len(f), device=device)).float().mean().item()
        return {"val_loss": loss, "val_top1": top1}
    loss = F.mse_loss(every, target).item()
    import results_utils  # the one Pearson r (NaN for constant voxels, left out of the mean)
    return {"val_loss": loss, "val_r": results_utils.pearson_r(target, every).nanmean().item()}


def _done_path(run_dir) -> Path:
    return Path(run_dir) / "done.json"


def read_done(run_dir) -> dict | None:
    """The summary of a finished run (run_dir/done.json), or None if it has not finished."""
    path = _done_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def train_roi_model(method: str, images: np.ndarray, fmri: np.ndarray, split: dict, roi_voxel_indices,
                    run_dir, settings: TrainSettings, options: dict | None = None, runtime: Runtime | None = None,
                    desc: str = "") -> dict:
    """Fine-tune one ROI model (CL or reg) on split['train'], selecting on split['val']; return a summary row.

    images: N x 3 x S x S uint8 cache; fmri: N x V float32 of the ROI. Writes run_dir/{best,last}.pt, log.csv and,
    when finished, done.json (rank 0 only). With settings.resume, continues from last.pt exactly.
    """
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm
    check_method(method)
    runtime = runtime or setup_runtime("auto")
    device, world = runtime.device, runtime.world_size
    run_dir = Path(run_dir)
    options = dict(options or {})
    metric_name = VAL_METRIC[method]
    n_voxels = fmri.shape[1]
    roi_voxel_indices = np.asarray(roi_voxel_indices, dtype=np.int64)
    train_idx, val_idx = np.asarray(split["train"]), np.asarray(split["val"])
    if len(train_idx) < 2 * world or len(val_idx) < 2:
        raise utils.DataError(f"{run_dir}: {len(train_idx)} training and {len(val_idx)} validation images; need at "
                              f"least {2 * world} and 2")
    if settings.batch_size < 2 * world:
        raise utils.DataError(f"batch_size={settings.batch_size}: need at least 2 images per rank ({world} ranks)")
    last_path, best_path, log_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "log.csv"

    done = read_done(run_dir) if settings.resume else None
    if done is not None and done.get("epochs", 0) >= settings.epochs:
        return {**done, "status": "done"}

    torch.manual_seed(settings.seed)
    model = build_model(method, n_voxels, settings.weights, settings.dropout).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    adam_kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, **adam_kwargs)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=settings.lr_factor,
                                                           patience=settings.lr_patience)
    start_epoch, history, best, status = 0, [], None, "trained"
    if settings.resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        _check_resumable(last_path, ckpt, method, settings, roi_voxel_indices, images.shape[-1])
        if ckpt["epoch"] >= settings.epochs:  # finished, but killed before done.json was written
            summary = _summary(method, n_voxels, "done", ckpt["metrics"], ckpt.get("best"))
            if runtime.is_main:
                utils.save_json(_done_path(run_dir), summary, options)
            runtime.barrier()
            return summary
        if "optimizer" not in ckpt:
            raise utils.DataError(f"{last_path}: finished run saved without optimizer state (slim_finished); it "
                                  f"cannot be extended from {ckpt['epoch']} to {settings.epochs} epochs; "
                                  "retrain with --resume=false")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start_epoch, history, best = ckpt["epoch"], ckpt["metrics"], ckpt.get("best")
        status = "resumed"
    elif runtime.is_main:
        _done_path(run_dir).unlink(missing_ok=True)  # a fresh run is not finished until it says so
    train_model = model
    if world > 1:
        # buffers (BatchNorm running stats) stay equal on every rank: DistBatchNorm1d uses global statistics
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)

    fmri_t = torch.from_numpy(np.ascontiguousarray(fmri, dtype=np.float32)).to(device)
    pin = device.type == "cuda"
    settings_dict = asdict(settings)
    epoch_bar = tqdm(total=settings.epochs, initial=start_epoch, desc=desc or f"{method} {run_dir.name}",
                     unit="epoch", disable=not runtime.is_main)
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        torch.manual_seed(_epoch_torch_seed(settings.seed, epoch, runtime.rank))
        batches = epoch_batches(train_idx, settings.batch_size, settings.seed, epoch)
        flips = _flips(len(images), settings.seed, epoch) if settings.hflip else None
        jobs = [(_shard(b, runtime), len(b)) for b in batches]
        model.train()
        loss_sum = torch.zeros((), device=device)
        data_s = fetch_s = 0.0

        def fetch(job):
            t0 = time.perf_counter()
            rows, n_global = job
            out = rows, n_global, read_rows(images, rows, pin)
            return out, time.perf_counter() - t0

        batch_bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False,
                         disable=not runtime.is_main)
        for ((rows, n_global, batch), fetch_seconds), waited in prefetched(fetch, jobs):
            t0 = time.perf_counter()
            x = prepare_images(batch, device, settings.channels_last, None if flips is None else flips[rows])
            y = fmri_t[torch.as_tensor(rows, device=device)]
            data_s += waited + time.perf_counter() - t0
            fetch_s += fetch_seconds
            with autocast_context(device, settings.amp, settings.cpu_bf16):
                loss_back, loss_value = batch_loss(method, train_model, x, y, settings.temperature,
                                                   settings.symmetric_loss)
            optimizer.zero_grad(set_to_none=True)
            loss_back.backward()
            optimizer.step()
            loss_sum += loss_value * n_global
            batch_bar.update(1)
        batch_bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t_epoch
        t_val = time.perf_counter()
        val = evaluate(method, model, images, fmri_t, val_idx, settings, runtime)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step(val["val_loss"])
        row = {"epoch": epoch, "train_loss": loss_sum.item() / len(train_idx), "val_loss": val["val_loss"],
               metric_name: val[metric_name], "lr": lr_used, "train_images_per_s": len(train_idx) / train_s,
               "data_s": data_s, "fetch_s": fetch_s, "train_s": train_s, "val_s": time.perf_counter() - t_val}
        improved = best is None or row["val_loss"] < best["val_loss"]
        if improved:
            best = {"epoch": epoch, "val_loss": row["val_loss"], metric_name: row[metric_name]}
        finished = epoch == settings.epochs
        meta = {"method": method, "settings": settings_dict, "best": best, "done": finished,
                "image_size": int(images.shape[-1]), "n_train": len(train_idx), "n_val": len(val_idx)}
        if runtime.is_main and improved:
            save_checkpoint(best_path, model, None, None, epoch, options, roi_voxel_indices, history + [row], **meta)
        row["epoch_s"] = time.perf_counter() - t_epoch  # training, validation and checkpoint writing
        history.append(row)
        if runtime.is_main:
            slim = finished and settings.slim_finished
            save_checkpoint(last_path, model, None if slim else optimizer, None if slim else scheduler, epoch,
                            options, roi_voxel_indices, history, **meta)
            utils.save_csv(log_path, history, options)
        epoch_bar.update(1)
        epoch_bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}",
                              **{metric_name: f"{row[metric_name]:.3f}"}, lr=f"{lr_used:.1e}",
                              img_s=f"{row['train_images_per_s']:.0f}")
        if settings.stop_after_epoch and epoch >= settings.stop_after_epoch and not finished:
            status = "stopped"
            break
    epoch_bar.close()
    summary = _summary(method, n_voxels, status, history, best)
    if runtime.is_main and history and history[-1]["epoch"] == settings.epochs:
        utils.save_json(_done_path(run_dir), summary, options)
    runtime.barrier()
    return summary


def _summary(method, n_voxels, status, history, best) -> dict:
    metric_name = VAL_METRIC[method]
    return {"method": method, "voxels": int(n_voxels), "status": status,
            "epochs": history[-1]["epoch"] if history else 0,
            "best_epoch": best["epoch"] if best else None,
            "best_val_loss": best["val_loss"] if best else None,
            f"best_{metric_name}": best[metric_name] if best else None,
            "minutes": sum(r["epoch_s"] for r in history) / 60}


def _check_resumable(path, ckpt, method, settings, roi_voxel_indices, image_size):
    saved = ckpt.get("settings", {})
    if ckpt.get("method") != method:
        raise utils.DataError(f"{path}: a {ckpt.get('method')} checkpoint, cannot resume it as {method}")
    if not np.array_equal(ckpt["roi_voxel_indices"].numpy(), roi_voxel_indices):
        raise utils.DataError(f"{path}: trained on other voxels than this ROI has now; retrain with --resume=false")
    if ckpt.get("image_size") != image_size:
        raise utils.DataError(f"{path}: trained at {ckpt.get('image_size')} px, now {image_size} px")
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(settings, k)!r}" for k in _RESUME_KEYS
               if saved.get(k) != getattr(settings, k)]
    if changed:
        raise utils.DataError(f"{path}: cannot resume with changed settings ({'; '.join(changed)}); restore them "
                              "or retrain with --resume=false")


# ---------------------------------------------------------------------------------------------
# Sweeps over ROIs and hemispheres.
# ---------------------------------------------------------------------------------------------


def parse_shard(text) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n): take every n-th (hemisphere, ROI) job starting at job i."""
    try:
        i, n = (int(t) for t in str(text).split("/"))
    except ValueError:
        raise utils.DataError(f"--shard={text}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise utils.DataError(f"--shard={text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def sweep_jobs(hemispheres, rois, shard=(0, 1)) -> list[tuple[str, str]]:
    """(hemisphere, ROI) jobs of a sweep ([] rois = all 31), this shard's share: jobs[i::n]."""
    hemispheres = [check_hemisphere(h) for h in (hemispheres or utils.HEMISPHERES)]
    rois = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)
    jobs = [(h, r) for h in hemispheres for r in rois]
    i, n = shard
    return jobs[i::n]


def train_roi_sweep(method: str, data: TrainingData, jobs, out_dir, settings: TrainSettings,
                    options: dict | None = None, runtime: Runtime | None = None) -> list[dict]:
    """Train every job's ROI model in turn: finished ones skipped, half-trained ones resumed, small ROIs listed."""
    runtime = runtime or setup_runtime("auto")
    rows = []
    for k, (hemi, roi) in enumerate(jobs):
        n_vox = len(data.voxel_indices[hemi][roi])
        base = {"hemisphere": hemi, "roi": roi, "voxels": n_vox}
        if n_vox < MIN_ROI_VOXELS:
            rows.append({**base, "status": f"skipped: {n_vox} voxels (< {MIN_ROI_VOXELS})"})
            continue
        run_dir = checkpoint_path(out_dir, method, data.subject, hemi, roi).parent
        fmri, idx = roi_fmri(data, hemi, roi)
        summary = train_roi_model(method, data.images, fmri, data.split, idx, run_dir, settings, options, runtime,
                                  desc=f"[{k + 1}/{len(jobs)}] {method} {hemi} {roi}")
        rows.append({**base, **{k2: v for k2, v in summary.items() if k2 not in ("method", "voxels")}})
    return rows


def run_single_roi_script(method: str, o: dict) -> dict:
    """The body of cl_/reg_model_training.py: train one subject / hemisphere / ROI from the script's options."""
    runtime = setup_runtime(o["device"], o["num_threads"])
    (roi,) = utils.check_roi_names([o["roi"]])
    hemi, subject = o["hemisphere"], o["subject"]
    data = load_training_data(o["data_dir"], o["out_dir"], subject, o["image_size"], o["split_seed"], [hemi],
                              o["check_values"], runtime=runtime)
    fmri, voxel_indices = roi_fmri(data, hemi, roi)
    run_dir = checkpoint_path(o["out_dir"], method, subject, hemi, roi).parent
    if runtime.is_main:
        print(f"{method} subject {subject} {hemi} {roi}: {len(voxel_indices)} voxels, "
              f"{len(data.split['train'])} train / {len(data.split['val'])} val images, {runtime.world_size} x "
              f"{runtime.device}")
    summary = train_roi_model(method, data.images, fmri, data.split, voxel_indices, run_dir,
                              TrainSettings.from_options(o), o, runtime)
    if runtime.is_main:
        print(format_table([{"hemisphere": hemi, "roi": roi, **summary}]))
        print(f"checkpoints and log in {run_dir}")
    runtime.close()
    return summary


def run_sweep_script(method: str, o: dict) -> list[dict]:
    """The body of cl_/reg_model_training_all_rois.py: this shard's (hemisphere, ROI) jobs, then a summary CSV."""
    runtime = setup_runtime(o["device"], o["num_threads"])
    shard_i, shard_n = parse_shard(o["shard"])
    jobs = sweep_jobs(o["hemispheres"], o["rois"], (shard_i, shard_n))
    data = load_training_data(o["data_dir"], o["out_dir"], o["subject"], o["image_size"], o["split_seed"],
                              sorted({h for h, _ in jobs}), o["check_values"], fmri_in_ram=True, runtime=runtime)
    rows = train_roi_sweep(method, data, jobs, o["out_dir"], TrainSettings.from_options(o), o, runtime)
    if runtime.is_main:
        name = "summary.csv" if shard_n == 1 else f"summary_shard-{shard_i}-of-{shard_n}.csv"
        table_path = Path(o["out_dir"]) / "models" / method / utils.subject_dir_name(o["subject"]) / name
        utils.save_csv(table_path, rows, o)
        print(format_table(rows))
        print(f"summary saved to {table_path}")
    runtime.close()
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows of dicts -> aligned text table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns: list = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [[str(c) for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)


# ---------------------------------------------------------------------------------------------
# Throughput measurement.
# ---------------------------------------------------------------------------------------------


def measure_throughput(method: str = "cl", n_voxels: int = 1000, image_size: int = 224, batch_size: int = 64,
                       steps: int = 5, warmup: int = 2, device="cpu", amp: bool = True, cpu_bf16: bool = True,
                       channels_last: bool = True, weights: str = "none") -> dict:
    """Training and inference images/s of a CL or reg model on random uint8 images (prepare_images included)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(method, n_voxels, weights).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6, fused=True)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    fmri = torch.randn(batch_size, n_voxels, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step():
        x = prepare_images(images, device, channels_last)
        with autocast_context(device, amp, cpu_bf16):
            loss, _ = batch_loss(method, model, x, fmri)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode(), autocast_context(device, amp, cpu_bf16):
            model.backbone(prepare_images(images, device, channels_last))

    out = {}
    for name, step, train_mode in (("train_images_per_s", train_step, True),
                                   ("inference_images_per_s", infer_step, False)):
        model.train(train_mode)
        for _ in range(warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        out[name] = batch_size * steps / (time.perf_counter() - t0)
    return out
