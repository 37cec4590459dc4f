"""Training ROI models: the runtime (device, torch.distributed), batches, the one training loop, sweeps, throughput.

The loop, `train_roi_model`, is used by all four training scripts. It is split into the steps a reader looks
for: `restore_or_init`, `train_one_epoch`, `evaluate`, `save_epoch`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import encoding
import models
import options
import outputs
import utils
from features import autocast_context, prefetched, prepare_images, read_rows

MIN_ROI_VOXELS = 20          # smaller ROIs give a degenerate head (h = 0.8 V, z = 0.2 V) and noisy targets
VAL_METRIC = {"cl": "val_top1", "reg": "val_r"}  # top-1 fMRI->image retrieval; mean voxel Pearson r
TRAINING_SCRIPTS = {"cl": "cl_model_training.py", "reg": "reg_model_training.py"}


# ---------------------------------------------------------------------------------------------
# Runtime: device, threads and torch.distributed (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK).
# ---------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

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
    dev = options.resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return Runtime(dev, rank, world)


# ---------------------------------------------------------------------------------------------
# Settings: the defaults live in each method's script OPTIONS block, nowhere else.
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Training hyper-parameters, taken from a training script's options (no defaults here: see the scripts)."""
    epochs: int
    batch_size: int                   # global batch, split over ranks under torchrun
    lr: float
    lr_patience: int                  # ReduceLROnPlateau on val loss
    lr_factor: float
    weights: str
    dropout: float                    # AlexNet classifier dropout
    seed: int
    amp: bool                         # bfloat16 autocast on GPU
    cpu_bf16: bool                    # bfloat16 autocast on CPUs with bf16 instructions
    channels_last: bool
    hflip: bool
    resume: bool
    stop_after_epoch: int             # 0 = train all epochs
    slim_finished: bool               # drop optimizer state from last.pt once done
    temperature: float | None = None  # CL only (a reg script has no such option)
    symmetric_loss: bool | None = None  # CL only

    @classmethod
    def from_options(cls, script_options: dict) -> "TrainSettings":
        return cls(**{f.name: script_options[f.name] for f in fields(cls) if f.name in script_options})


def default_settings(method: str, **overrides) -> TrainSettings:
    """The settings a method's training script runs with by default (read from its OPTIONS block), overridden."""
    script = Path(__file__).resolve().parent / TRAINING_SCRIPTS[models.check_method(method)]
    return TrainSettings.from_options({**options.script_defaults(script), **overrides})


# settings that must match to resume a run (epochs may grow; speed settings may change)
_RESUME_KEYS = ("batch_size", "lr", "temperature", "symmetric_loss", "lr_patience", "lr_factor", "weights",
                "dropout", "seed", "hflip")


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------


def roi_fmri(subject_data: utils.Subject, hemi: str, roi: str):
    """-> (N x V float32 fMRI of the ROI in RAM, its vertex indices); DataError when under MIN_ROI_VOXELS."""
    (roi,) = utils.check_roi_names([roi])
    idx = subject_data.roi_voxel_indices[hemi][roi]
    if len(idx) < MIN_ROI_VOXELS:
        raise utils.DataError(f"subject {subject_data.subject} {hemi} {roi}: {len(idx)} voxels; training needs at "
                              f"least {MIN_ROI_VOXELS} (some ROIs are empty for some subjects)")
    return np.ascontiguousarray(subject_data.fmri[hemi][:, idx], dtype=np.float32), idx


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


# ---------------------------------------------------------------------------------------------
# The loop: restore or init, one epoch, evaluate, save.
# ---------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """Everything one ROI model's training carries from epoch to epoch."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_epoch: int = 0
    history: list = None
    best: dict | None = None
    status: str = "trained"
    finished_summary: dict | None = None   # set when last.pt is already final (killed before done.json)


def _done_path(run_dir) -> Path:
    return Path(run_dir) / "done.json"


def read_done(run_dir) -> dict | None:
    """The summary of a finished run (run_dir/done.json), or None if it has not finished."""
    path = _done_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def restore_or_init(method: str, n_voxels: int, run_dir: Path, settings: TrainSettings, roi_voxel_indices,
                    image_size: int, runtime: Runtime) -> RunState:
    """A seeded new model, optimizer and LR schedule, or all of them restored exactly from run_dir/last.pt."""
    device = runtime.device
    torch.manual_seed(settings.seed)
    model = models.build_model(method, n_voxels, settings.weights, settings.dropout).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    adam_kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, **adam_kwargs)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=settings.lr_factor,
                                                           patience=settings.lr_patience)
    state = RunState(model, optimizer, scheduler, history=[])
    last_path = run_dir / "last.pt"
    if settings.resume and last_path.is_file():
        ckpt = models.load_checkpoint(last_path)
        _check_resumable(last_path, ckpt, method, settings, roi_voxel_indices, image_size)
        if ckpt["epoch"] >= settings.epochs:  # finished, but killed before done.json was written
            state.finished_summary = _summary(method, n_voxels, "done", ckpt["metrics"], ckpt.get("best"))
            return state
        if "optimizer" not in ckpt:
            raise utils.DataError(f"{last_path}: finished run saved without optimizer state (slim_finished); it "
                                  f"cannot be extended from {ckpt['epoch']} to {settings.epochs} epochs; "
                                  "retrain with --resume=false")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state.start_epoch, state.history, state.best = ckpt["epoch"], ckpt["metrics"], ckpt.get("best")
        state.status = "resumed"
    elif runtime.is_main:
        _done_path(run_dir).unlink(missing_ok=True)  # a fresh run is not finished until it says so
    return state


def train_one_epoch(method: str, train_model: nn.Module, optimizer, images: np.ndarray, fmri_t: torch.Tensor,
                    train_idx: np.ndarray, epoch: int, settings: TrainSettings, runtime: Runtime) -> dict:
    """One pass over this epoch's seeded batches (each rank its shard of every global batch) -> loss and timings."""
    from tqdm import tqdm
    device = runtime.device
    t_epoch = time.perf_counter()
    torch.manual_seed(_epoch_torch_seed(settings.seed, epoch, runtime.rank))
    batches = epoch_batches(train_idx, settings.batch_size, settings.seed, epoch)
    flips = _flips(len(images), settings.seed, epoch) if settings.hflip else None
    jobs = [(_shard(b, runtime), len(b)) for b in batches]
    train_model.train()
    pin = device.type == "cuda"
    loss_sum = torch.zeros((), device=device)
    data_s = fetch_s = 0.0

    def fetch(job):
        t0 = time.perf_counter()
        rows, n_global = job
        return (rows, n_global, read_rows(images, rows, pin)), time.perf_counter() - t0

    batch_bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not runtime.is_main)
    for ((rows, n_global, batch), fetch_seconds), waited in prefetched(fetch, jobs):
        t0 = time.perf_counter()
        x = prepare_images(batch, device, settings.channels_last, None if flips is None else flips[rows])
        y = fmri_t[torch.as_tensor(rows, device=device)]
        data_s += waited + time.perf_counter() - t0
        fetch_s += fetch_seconds
        with autocast_context(device, settings.amp, settings.cpu_bf16):
            loss_back, loss_value = models.batch_loss(method, train_model, x, y, settings.temperature,
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
    return {"train_loss": loss_sum.item() / len(train_idx), "train_images_per_s": len(train_idx) / train_s,
            "data_s": data_s, "fetch_s": fetch_s, "train_s": train_s}


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
    outs = []
    with autocast_context(device, settings.amp, settings.cpu_bf16):
        for (rows, batch), _ in prefetched(lambda r: (r, read_rows(images, r, pin)), chunks):
            x = prepare_images(batch, device, settings.channels_last)
            rows_t = torch.as_tensor(rows, device=device)
            if method == "cl":
                f, g = model(x, fmri_t[rows_t])
                outs.append(torch.cat([f.float(), g.float()], 1))
            else:
                outs.append(model(x).float())
    width = (2 * model.embed_dim) if method == "cl" else model.n_voxels
    local = torch.cat(outs) if outs else torch.zeros(0, width, device=device)
    every = models.gather_rows(local)
    target = fmri_t[torch.as_tensor(indices, device=device)]
    model.train(was_training)
    if method == "cl":
        f, g = every[:, :model.embed_dim], every[:, model.embed_dim:]
        # the loss over val batches like the training batches (negatives within a batch)
        batches = np.array_split(np.arange(len(indices)), max(1, math.ceil(len(indices) / settings.batch_size)))
        loss = sum(len(b) * models.contrastive_loss(f[b], g[b], settings.temperature, settings.symmetric_loss).item()
                   for b in batches) / len(indices)
        sim = F.normalize(f, dim=1) @ F.normalize(g, dim=1).T
        top1 = (sim.argmax(1) == torch.arange(len(f), device=device)).float().mean().item()
        return {"val_loss": loss, "val_top1": top1}
    loss = F.mse_loss(every, target).item()
    val_r = encoding.pearson_r(target.double().cpu().numpy(), every.double().cpu().numpy())
    return {"val_loss": loss, "val_r": float(np.nanmean(val_r))}


def save_epoch(state: RunState, run_dir: Path, row: dict, t_epoch: float, method: str, settings: TrainSettings,
               roi_voxel_indices, image_size: int, n_train: int, n_val: int, script_options: dict,
               runtime: Runtime) -> bool:
    """Record one epoch: best.pt when val loss improved, last.pt (exact resume point) and log.csv. -> improved."""
    metric_name = VAL_METRIC[method]
    improved = state.best is None or row["val_loss"] < state.best["val_loss"]
    if improved:
        state.best = {"epoch": row["epoch"], "val_loss": row["val_loss"], metric_name: row[metric_name]}
    finished = row["epoch"] == settings.epochs
    meta = {"method": method, "settings": asdict(settings), "best": state.best, "done": finished,
            "image_size": int(image_size), "n_train": n_train, "n_val": n_val}
    if runtime.is_main and improved:
        models.save_checkpoint(run_dir / "best.pt", state.model, None, None, row["epoch"], script_options,
                               roi_voxel_indices, state.history + [row], **meta)
    row["epoch_s"] = time.perf_counter() - t_epoch  # training, validation and checkpoint writing
    state.history.append(row)
    if runtime.is_main:
        slim = finished and settings.slim_finished
        models.save_checkpoint(run_dir / "last.pt", state.model, None if slim else state.optimizer,
                               None if slim else state.scheduler, row["epoch"], script_options, roi_voxel_indices,
                               state.history, **meta)
        outputs.save_csv(run_dir / "log.csv", state.history, script_options)
    return improved


def train_roi_model(method: str, images: np.ndarray, fmri: np.ndarray, split: dict, roi_voxel_indices,
                    run_dir, settings: TrainSettings, script_options: dict | None = None,
                    runtime: Runtime | None = None, desc: str = "") -> dict:
    """Fine-tune one ROI model (CL or reg) on split['train'], selecting on split['val']; return a summary row.

    images: N x 3 x S x S uint8 cache; fmri: N x V float32 of the ROI. Writes run_dir/{best,last}.pt, log.csv and,
    when finished, done.json (rank 0 only). With settings.resume, continues from last.pt exactly.
    """
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm
    models.check_method(method)
    runtime = runtime or setup_runtime("auto")
    device, world = runtime.device, runtime.world_size
    run_dir = Path(run_dir)
    script_options = dict(script_options or {})
    metric_name = VAL_METRIC[method]
    n_voxels = fmri.shape[1]
    roi_voxel_indices = np.asarray(roi_voxel_indices, dtype=np.int64)
    train_idx, val_idx = np.asarray(split["train"]), np.asarray(split["val"])
    if len(train_idx) < 2 * world or len(val_idx) < 2:
        raise utils.DataError(f"{run_dir}: {len(train_idx)} training and {len(val_idx)} validation images; need at "
                              f"least {2 * world} and 2")
    if settings.batch_size < 2 * world:
        raise utils.DataError(f"batch_size={settings.batch_size}: need at least 2 images per rank ({world} ranks)")
    if method == "cl" and settings.temperature is None:
        raise utils.DataError("CL training needs a temperature (cl_model_training.py's option)")

    done = read_done(run_dir) if settings.resume else None
    if done is not None and done.get("epochs", 0) >= settings.epochs:
        return {**done, "status": "done"}
    state = restore_or_init(method, n_voxels, run_dir, settings, roi_voxel_indices, images.shape[-1], runtime)
    if state.finished_summary is not None:
        if runtime.is_main:
            outputs.save_json(_done_path(run_dir), state.finished_summary, script_options)
        runtime.barrier()
        return state.finished_summary
    train_model = state.model
    if world > 1:
        # buffers (BatchNorm running stats) stay equal on every rank: DistBatchNorm1d uses global statistics
        train_model = DistributedDataParallel(state.model, broadcast_buffers=False,
                                              device_ids=[device.index] if device.type == "cuda" else None)

    fmri_t = torch.from_numpy(np.ascontiguousarray(fmri, dtype=np.float32)).to(device)
    epoch_bar = tqdm(total=settings.epochs, initial=state.start_epoch, desc=desc or f"{method} {run_dir.name}",
                     unit="epoch", disable=not runtime.is_main)
    for epoch in range(state.start_epoch + 1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        train = train_one_epoch(method, train_model, state.optimizer, images, fmri_t, train_idx, epoch, settings,
                                runtime)
        t_val = time.perf_counter()
        val = evaluate(method, state.model, images, fmri_t, val_idx, settings, runtime)
        lr_used = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step(val["val_loss"])
        row = {"epoch": epoch, "train_loss": train["train_loss"], "val_loss": val["val_loss"],
               metric_name: val[metric_name], "lr": lr_used, "train_images_per_s": train["train_images_per_s"],
               "data_s": train["data_s"], "fetch_s": train["fetch_s"], "train_s": train["train_s"],
               "val_s": time.perf_counter() - t_val}
        save_epoch(state, run_dir, row, t_epoch, method, settings, roi_voxel_indices, images.shape[-1], len(train_idx),
                   len(val_idx), script_options, runtime)
        epoch_bar.update(1)
        epoch_bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}",
                              **{metric_name: f"{row[metric_name]:.3f}"}, lr=f"{lr_used:.1e}",
                              img_s=f"{row['train_images_per_s']:.0f}")
        if settings.stop_after_epoch and epoch >= settings.stop_after_epoch and epoch != settings.epochs:
            state.status = "stopped"
            break
    epoch_bar.close()
    summary = _summary(method, n_voxels, state.status, state.history, state.best)
    if runtime.is_main and state.history and state.history[-1]["epoch"] == settings.epochs:
        outputs.save_json(_done_path(run_dir), summary, script_options)
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
    hemispheres = [utils.check_hemisphere(h) for h in (hemispheres or utils.HEMISPHERES)]
    rois = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)
    jobs = [(h, r) for h in hemispheres for r in rois]
    i, n = shard
    return jobs[i::n]


def sweep_summary_path(out_dir, method: str, subject: int, shard=(0, 1)) -> Path:
    """out_dir/models/{method}/subjXX/summary[_shard-i-of-n].csv."""
    i, n = shard
    name = "summary.csv" if n == 1 else f"summary_shard-{i}-of-{n}.csv"
    return Path(out_dir) / "models" / method / utils.subject_dir_name(subject) / name


# ---------------------------------------------------------------------------------------------
# Throughput (benchmark.py reports it).
# ---------------------------------------------------------------------------------------------


def measure_throughput(method: str = "cl", n_voxels: int = 1000, image_size: int = 224, batch_size: int = 64,
                       steps: int = 5, warmup: int = 2, device="cpu", amp: bool = True, cpu_bf16: bool = True,
                       channels_last: bool = True, weights: str = "none") -> dict:
    """Training and inference images/s of a CL or reg model on random uint8 images (prepare_images included)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = models.build_model(method, n_voxels, weights).to(device)
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
            loss, _ = models.batch_loss(method, model, x, fmri, temperature=1.0)  # speed does not depend on it
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
