"""The CL and reg ROI models on an AlexNet backbone, the contrastive loss (across ranks) and the one checkpoint format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import outputs
import utils

ALEXNET_LAYERS = ("features.2", "features.5", "features.7", "features.9", "features.12",
                  "classifier.2", "classifier.5", "classifier.6")
METHODS = ("cl", "reg")
CHECKPOINT_FORMAT = "roi_model_v1"


# ---------------------------------------------------------------------------------------------
# Backbone.
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


def contrastive_loss(fmri_emb: torch.Tensor, img_emb: torch.Tensor, temperature: float,
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
               temperature: float | None = None, symmetric: bool | None = False):
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
# Checkpoints: one format (plain types and tensors, loadable with weights_only=True).
# ---------------------------------------------------------------------------------------------


def checkpoint_path(out_dir, method: str, subject: int, hemi: str, roi: str, which: str = "best") -> Path:
    """out_dir/models/{method}/subjXX/{hemi}/{roi}/{which}.pt ('best' = lowest val loss, 'last' = for resuming)."""
    if which not in ("best", "last"):
        raise ValueError(f"which={which!r}: expected 'best' or 'last'")
    return Path(out_dir) / "models" / check_method(method) / utils.subject_dir_name(subject) / hemi / roi / f"{which}.pt"


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
        "options": outputs.plain(options or {}, strict=False),
        "roi_voxel_indices": torch.as_tensor(np.asarray(roi_voxel_indices if roi_voxel_indices is not None else [],
                                                        dtype=np.int64)),
        "metrics": outputs.plain(metrics or [], strict=False),
        "rng": {"torch": torch.get_rng_state()},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = outputs.plain(scheduler.state_dict(), strict=False)
    ckpt.update(outputs.plain(extra, strict=False))
    return outputs.atomic_write(path, lambda fh: torch.save(ckpt, fh), suffix=".tmp.pt")


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
