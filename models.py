"""The CL and reg ROI models (per subject or pooled over subjects), the contrastive loss across ranks, checkpoints."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import backbones
import options
import outputs

METHODS = ("cl", "reg")
H_METHODS = ("subject", "constant", "average")  # CL hidden size: int(0.8 V) of one subject, 5741, mean V
POOLED_H_CONSTANT = 5741       # the original pooled models' constant hidden size (h_max_dim)
CHECKPOINT_FORMAT = "roi_model_v2"  # v2: model_spec, subjects, a bias-free last head layer, per-subject projections


# ---------------------------------------------------------------------------------------------
# Backbone (backbones.py): built for a ROI model, its weights named canonically, its input normalisation.
# ---------------------------------------------------------------------------------------------

def weights_name(backbone: str, weights) -> str:
    """The canonical weights option: 'none', a file path as given, a torchvision tag resolved ('DEFAULT' -> e.g.
    'IMAGENET1K_V1', so caches and searches of either spelling are one), or as given (timm, open_clip)."""
    kind = backbones.weights_kind(weights)
    if kind == "tag" and backbones.parse(backbone).source == "torchvision":
        return backbones._torchvision_weights(backbones.parse(backbone).model, weights).name
    return "none" if kind == "none" else str(weights)


def backbone_name(recorded) -> str:
    """The backbone of a model_spec's 'backbone' entry: a spec dict, a name, or None (checkpoints before backbones
    were recorded: AlexNet)."""
    return backbones.parse((recorded.get("name") if isinstance(recorded, dict) else recorded) or "alexnet").name


def roi_backbone(backbone: str = "alexnet", weights="DEFAULT", dropout: float | None = 0.5) -> nn.Module:
    """backbones.build, with `dropout` the p of the dropout layers that are on as built (AlexNet's classifier: two at
    0.5; the p = 0 ones of ViTs stay off), and its input preprocessing kept as net.preprocessing."""
    net = backbones.build(backbone, weights)
    for module in net.modules():
        if dropout is not None and isinstance(module, nn.Dropout) and module.p > 0:
            module.p = float(dropout)
    net.preprocessing = preprocessing_of(backbone, weights)
    return net


@functools.lru_cache(maxsize=None)
def weightless_backbone(backbone: str) -> nn.Module:
    """A backbone's network with its parameters on the meta device (no memory, no init time; the caller's random
    state untouched): to trace its layers and their shapes."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return backbones.build(backbone, "none").eval()
        except (NotImplementedError, RuntimeError):  # a network that cannot be built there
            return backbones.build(backbone, "none").eval()


def preprocessing_of(backbone: str, weights) -> backbones.Preprocessing:
    """The preprocessing of a backbone's weights (a local file's: as a random init's, the architecture's default)."""
    weights = "none" if str(weights).startswith("file:") else weights  # a spec's record of a local file
    return backbones.preprocessing(backbone, weights)


def normalisation(net: nn.Module) -> tuple[tuple, tuple]:
    """(mean, std) that images are normalised with for a backbone or ROI model (ImageNet's for a foreign network)."""
    net = getattr(net, "module", net)
    pre = getattr(net, "preprocessing", None) or getattr(getattr(net, "backbone", None), "preprocessing", None)
    if pre is None and isinstance(getattr(net, "backbone_spec", None), dict):
        pre = preprocessing_of(net.backbone_spec["name"], net.backbone_spec["weights"])
    return (pre.mean, pre.std) if pre is not None else (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)


def check_image_size(backbone: str, weights, image_size: int) -> None:
    """A backbone that takes one input size only (ViTs, CLIP; the tiny-vit stand-in: 32 px) refuses another."""
    pre = preprocessing_of(backbone, weights)
    if pre.fixed_size and int(image_size) != pre.size:
        raise options.DataError(f"--image_size={image_size}: {backbones.parse(backbone).name} takes only "
                                f"{pre.size} px images (its input size is fixed); use --image_size={pre.size}")


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


def cl_dims(voxel_counts, h_method: str = "subject") -> tuple[int, int]:
    """(hidden h, embedding z) of a CL model: z = int(0.25 h) and h by h_method, as in the original code.

    'subject': h = int(0.8 V) of a per-subject model (then z = int(0.2 V) exactly, for every V);
    'constant': h = 5741 (pooled); 'average': h = int(mean V) over the pooled subjects.
    """
    counts = [int(v) for v in voxel_counts]
    if h_method == "subject":
        if len(counts) != 1:
            raise options.DataError(f"h_method='subject' is for one subject, got {len(counts)}; use 'constant' or "
                                  "'average' for pooled models")
        hidden = int(counts[0] * 0.8)
    elif h_method == "constant":
        hidden = POOLED_H_CONSTANT
    elif h_method == "average":
        hidden = int(np.mean(counts))
    else:
        raise options.DataError(f"unknown h_method {h_method!r}; expected one of {', '.join(H_METHODS)}")
    return hidden, int(hidden * 0.25)


def model_spec(method: str, voxel_counts, backbone: str = "alexnet", h_method: str = "subject") -> dict:
    """The plain description a model is rebuilt from: method, voxels per subject, sizes, backbone (a name here; the
    built model's spec holds backbones.spec, its name, weights and embedding size, and checkpoints keep that)."""
    check_method(method)
    counts = [int(v) for v in np.atleast_1d(voxel_counts)]
    if not counts or min(counts) < 1:
        raise options.DataError(f"voxel counts {counts}: expected one positive count per subject")
    spec = {"method": method, "n_voxels": counts, "backbone": backbone}
    if method == "cl":
        spec["hidden"], spec["embed_dim"] = cl_dims(counts, h_method)
    return spec


class CLModel(nn.Module):
    """The CL model: backbone (its embedding: AlexNet's 1000 logits, others' pooled pre-logit features or CLIP's
    image embedding) -> image projection; one fMRI projection per subject; a shared head.

    Head: Linear(h,h)-BN-ReLU-Linear(h,h)-BN-ReLU-Linear(h,z, no bias), as in the original. A per-subject
    model is the one-subject case (h = int(0.8 V)); a pooled model shares backbone, image projection and head.
    """

    def __init__(self, n_voxels, hidden: int, embed_dim: int, weights: str = "DEFAULT",
                 dropout: float = 0.5, backbone: str = "alexnet"):
        super().__init__()
        self.n_voxels = [int(v) for v in n_voxels]
        self.hidden, self.embed_dim = int(hidden), int(embed_dim)
        self.backbone = roi_backbone(backbone, weights, dropout)
        self.spec = {"method": "cl", "n_voxels": self.n_voxels, "backbone": backbones.spec(self.backbone),
                     "hidden": self.hidden, "embed_dim": self.embed_dim}  # what checkpoints rebuild the model from
        h, z = self.hidden, self.embed_dim
        self.image_proj = nn.Linear(backbones.embed_dim(self.backbone), h, bias=False)
        self.fmri_proj = nn.ModuleList(nn.Linear(v, h, bias=False) for v in self.n_voxels)
        self.head = nn.Sequential(nn.Linear(h, h), DistBatchNorm1d(h), nn.ReLU(inplace=True),
                                  nn.Linear(h, h), DistBatchNorm1d(h), nn.ReLU(inplace=True),
                                  nn.Linear(h, z, bias=False))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_proj(self.backbone(images)))

    def embed_fmri(self, fmri: torch.Tensor, source: int = 0) -> torch.Tensor:
        """fMRI of subject number `source` (its position in n_voxels) -> embeddings."""
        return self.head(self.fmri_proj[source](fmri))

    def forward(self, images: torch.Tensor, fmri: torch.Tensor, source: int = 0):
        """-> (fmri embeddings, image embeddings), both batch x z."""
        return self.embed_fmri(fmri, source), self.embed_images(images)


class RegModel(nn.Module):
    """Regression baseline: backbone (its embedding, as CLModel) -> a linear read-out to V_s voxels per subject, MSE."""

    def __init__(self, n_voxels, weights: str = "DEFAULT", dropout: float = 0.5, backbone: str = "alexnet"):
        super().__init__()
        self.n_voxels = [int(v) for v in n_voxels]
        self.backbone = roi_backbone(backbone, weights, dropout)
        self.spec = {"method": "reg", "n_voxels": self.n_voxels, "backbone": backbones.spec(self.backbone)}
        self.readout = nn.ModuleList(nn.Linear(backbones.embed_dim(self.backbone), v) for v in self.n_voxels)

    def forward(self, images: torch.Tensor, source: int = 0) -> torch.Tensor:
        return self.readout[source](self.backbone(images))


def model_from_spec(spec: dict, weights: str = "DEFAULT", dropout: float = 0.5) -> nn.Module:
    """The (untrained) model a model_spec describes; seed torch first for a reproducible init."""
    backbone = backbone_name(spec.get("backbone"))
    if check_method(spec["method"]) == "cl":
        return CLModel(spec["n_voxels"], spec["hidden"], spec["embed_dim"], weights, dropout, backbone)
    return RegModel(spec["n_voxels"], weights, dropout, backbone)


def build_model(method: str, n_voxels, weights: str = "DEFAULT", dropout: float = 0.5,
                backbone: str = "alexnet", h_method: str = "subject") -> nn.Module:
    """CLModel for 'cl', RegModel for 'reg'; n_voxels: one count (per subject) or one per pooled subject."""
    return model_from_spec(model_spec(method, n_voxels, backbone, h_method), weights, dropout)


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Eval mode (dropout off), but BatchNorm normalises with each batch's statistics, as in training.

    Running statistics are neither used nor updated (track_running_stats off inside the block); under
    torch.distributed DistBatchNorm1d takes the statistics of the global batch, as in training.
    """
    modes = {m: m.training for m in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    model.eval()
    for m in norms:
        m.training, m.track_running_stats = True, False
    try:
        yield model
    finally:
        for m, track in zip(norms, tracked):
            m.track_running_stats = track
        for m, mode in modes.items():
            m.training = mode


def check_method(method: str) -> str:
    if method not in METHODS:
        raise options.DataError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
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
               temperature: float | None = None, symmetric: bool | None = False, source: int = 0):
    """Loss of one global batch (of subject `source`) from this rank's shard -> (tensor to backpropagate, value).

    Under DDP (which averages gradients over ranks) the backpropagated tensor is scaled so the averaged
    gradient equals the single-process gradient on the whole global batch:
    CL: every rank computes the full global-batch loss with gradients through its own rows, times world size;
    reg: this rank's squared errors over the global element count, times world size.
    """
    world = _dist_world()
    if method == "cl":
        fmri_emb, img_emb = model(images, fmri, source)
        loss = contrastive_loss(gather_rows(fmri_emb), gather_rows(img_emb), temperature, symmetric)
        return loss * world, loss.detach()
    pred = _upcast(model(images, source))
    sse = ((pred - fmri) ** 2).sum()
    stats = torch.stack([sse.detach(), torch.tensor(float(pred.numel()), device=pred.device, dtype=sse.dtype)])
    if world > 1:
        dist.all_reduce(stats)
    return sse / stats[1] * world, stats[0] / stats[1]


# ---------------------------------------------------------------------------------------------
# Checkpoints: one format (plain types and tensors, loadable with weights_only=True).
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, epoch: int = 0,
                    script_options: dict | None = None, roi_voxel_indices=None, metrics: list | None = None,
                    subjects=None, weights_dtype: str = "float32", **extra) -> Path:
    """Atomically torch.save {model, model_spec, subjects, roi_voxel_indices, optimizer, scheduler, epoch, ...}.

    roi_voxel_indices: one index array per subject of the model (or one array for a per-subject model).
    weights_dtype: 'bfloat16' stores the floating-point weights in bfloat16 (half the disk; loading casts back).
    """
    model = getattr(model, "module", model)  # unwrap DDP
    indices = roi_voxel_indices if roi_voxel_indices is not None else [[] for _ in model.n_voxels]
    if len(indices) and np.ndim(indices[0]) == 0:  # one flat array: a per-subject model
        indices = [indices]
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_class": type(model).__name__,
        "model_spec": outputs.plain(model.spec),
        "subjects": [int(s) for s in subjects] if subjects is not None else [],
        "model": {k: v.detach().cpu().to(_STORED_DTYPES[weights_dtype]) if v.is_floating_point() else v.detach().cpu()
                  for k, v in model.state_dict().items()},
        "weights_dtype": weights_dtype,
        "epoch": int(epoch),
        "options": outputs.plain(script_options or {}, strict=False),
        "roi_voxel_indices": [torch.as_tensor(np.asarray(i, dtype=np.int64)) for i in indices],
        "metrics": outputs.plain(metrics or [], strict=False),
        "rng": {"torch": torch.get_rng_state()},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = outputs.plain(scheduler.state_dict(), strict=False)
    ckpt.update(outputs.plain(extra, strict=False))
    return outputs.atomic_write(path, lambda fh: torch.save(ckpt, fh), suffix=".tmp.pt")


_STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """torch.load(weights_only=True) of a checkpoint written by save_checkpoint, or a DataError naming the file.
    mmap: tensors are mapped, not read (to look at the metadata)."""
    import pickle
    path = Path(path)
    if not path.is_file():
        raise options.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated or foreign file
        if isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower():
            # PyTorch's message advises weights_only=False: never for a file this repo reads
            raise options.DataError(f"{path}: not a checkpoint of this repo (it holds Python objects beyond tensors "
                                    "and plain types, which are not unpickled here); retrain the model") from None
        # the first line of the cause, never PyTorch's advice to load with weights_only=False
        first = "not a PyTorch file" if isinstance(err, pickle.UnpicklingError) else \
            (str(err).splitlines() or [""])[0]
        raise options.DataError(f"{path}: unreadable checkpoint, truncated or not written by this repo "
                                f"({type(err).__name__}: {first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise options.DataError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (written by models.save_checkpoint"
                              + (f"; this one is {found}: retrain it)" if found else ")"))
    return ckpt


def checkpoint_source_index(ckpt: dict, subject: int) -> int:
    """Which of a checkpoint's fMRI projections (read-outs) is `subject`'s (0 for a per-subject model)."""
    subjects = list(ckpt.get("subjects") or [])
    if subject in subjects:
        return subjects.index(subject)
    if len(subjects) <= 1:
        return 0
    raise options.DataError(f"subject {subject} is not one of this pooled model's subjects {subjects}")


def load_roi_model(path, device="cpu", backbone: str | None = None) -> nn.Module:
    """The whole tuned CL or reg model of a checkpoint, per-subject or pooled (eval mode)."""
    return roi_model_from_checkpoint(load_checkpoint(path), device, backbone, path)


def roi_model_from_checkpoint(ckpt: dict, device="cpu", backbone: str | None = None, path="checkpoint") -> nn.Module:
    """The whole tuned model of a loaded checkpoint (float32 weights, eval mode); backbone: refuse another one."""
    recorded = ckpt["model_spec"].get("backbone")
    if backbone is not None:
        backbones.check_same_backbone(path, recorded, backbone)
    model = model_from_spec(ckpt["model_spec"], weights="none")
    model.load_state_dict(ckpt["model"])
    _restore_record(model.backbone, recorded)
    model.spec["backbone"] = backbones.spec(model.backbone)
    return model.to(device).eval()


def load_tuned_backbone(path, device="cpu", backbone: str | None = None) -> nn.Module:
    """The fine-tuned backbone of a CL or reg checkpoint, per-subject or pooled (eval mode), for features;
    backbone: refuse a checkpoint of another one (one line)."""
    ckpt = load_checkpoint(path)
    recorded = ckpt["model_spec"].get("backbone")
    if backbone is not None:
        backbones.check_same_backbone(path, recorded, backbone)
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if not state:
        raise options.DataError(f"{path}: checkpoint holds no backbone weights")
    net = roi_backbone(backbone_name(recorded), "none", dropout=None)
    net.load_state_dict(state)
    _restore_record(net, recorded)
    return net.to(device).eval()


def _restore_record(net: nn.Module, recorded) -> None:
    """A backbone rebuilt from a checkpoint (weights none) takes back the record of the weights it was tuned from,
    and their preprocessing."""
    if isinstance(recorded, dict):
        net.backbone_spec = {**net.backbone_spec, "weights": recorded.get("weights", "none")}
    net.preprocessing = preprocessing_of(net.backbone_spec["name"], net.backbone_spec["weights"])


def checkpoint_backbone(path) -> str:
    """The backbone name a checkpoint was trained with, read without loading its weights (memory-mapped)."""
    return backbone_name(load_checkpoint(path, mmap=True)["model_spec"].get("backbone"))
