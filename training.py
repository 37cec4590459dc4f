"""Training ROI models: the settings, the one training loop (per subject or pooled), checkpoints per epoch, sweeps.

The loop, `train_roi_model`, trains a per-subject model (one source) or a model pooled over subjects (several
sources) for all training scripts. It is split into the steps a reader looks for: `restore_or_init`,
`train_one_epoch`, `evaluate`, `save_epoch`. Sources and batches come from training_data.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import backbones
import encoding
import models
import options
import outputs
import paths
import training_data
import utils
from runtime import Runtime, autocast_context, prepare_images, setup_runtime

VAL_METRIC = {"cl": "val_top1", "reg": "val_r"}  # top-1 fMRI->image retrieval; mean voxel Pearson r
LR_SCHEDULES = ("plateau", "none")
CHECKPOINT_DTYPES = ("float32", "bfloat16")
FIT_SPLITS = ("train", "train+val")


# ---------------------------------------------------------------------------------------------
# Settings: the defaults live in each method's script OPTIONS block, nowhere else.
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Training hyper-parameters, taken from a training script's options (no defaults here: see the scripts;
    `pooled` is set by the script from its `subjects`)."""
    epochs: int
    batch_size: int                   # global batch, split over ranks under torchrun
    lr: float
    lr_schedule: str                  # "plateau": ReduceLROnPlateau on val loss; "none": constant lr
    lr_patience: int                  # plateau: epochs without improvement
    lr_factor: float
    backbone: str                     # backbones.parse name (canonical); "tiny", "tiny-vit": stand-ins for tests
    weights: str                      # canonical (models.weights_name): DEFAULT is resolved for torchvision
    dropout: float                    # p of the backbone's dropout layers that are on (AlexNet's classifier)
    amp: bool                         # bfloat16 autocast on GPU
    cpu_bf16: bool                    # bfloat16 autocast on CPUs with bf16 instructions
    channels_last: bool
    hflip: bool
    loader_workers: int               # DataLoader worker processes reading batches ahead
    resume: bool
    stop_after_epoch: int             # 0 = train all epochs
    keep_last: bool                   # keep last.pt (optimizer included) once done; else only best.pt stays
    min_voxels: int                   # an ROI (a pooled subject) trains with at least this many voxels
    batching: str                     # even: near-equal global batches | remainder: batch_size and a smaller last
    fit_split: str                    # train | train+val (the original's 85 %; needs lr_schedule none, keep_last)
    checkpoint_dtype: str             # float32 | bfloat16: the dtype of best.pt's weights (last.pt: float32)
    subject_order: str                # pooled: batches of the subjects interleaved or one subject after another
    temperature: float | None = None  # CL only (a reg script has no such option)
    symmetric_loss: bool | None = None  # CL only
    pooled_h_method: str | None = None  # pooled CL only: h = 5741 (constant) or the mean voxel count (average)
    pooled: bool = False              # several subjects (the scripts' `subjects`): one model pooled over them
    seed: int = 0                     # model init, batch order, dropout (the scripts loop over their `seeds`)

    @classmethod
    def from_options(cls, script_options: dict, pooled: bool = False) -> "TrainSettings":
        values = {f.name: script_options[f.name] for f in fields(cls) if f.name in script_options}
        values["backbone"] = models.backbone_name(values["backbone"])
        values["weights"] = models.weights_name(values["backbone"], values["weights"])
        return cls(**values, pooled=pooled)

    @property
    def h_method(self) -> str:
        """The CL hidden-size rule: h = int(0.8 V) per subject; pooled_h_method for pooled models."""
        return self.pooled_h_method if self.pooled else "subject"


# settings that must match to resume a run (epochs may grow; speed settings may change)
_RESUME_KEYS = ("batch_size", "lr", "lr_schedule", "temperature", "symmetric_loss", "lr_patience", "lr_factor",
                "backbone", "weights", "dropout", "seed", "hflip", "pooled_h_method", "subject_order", "batching",
                "fit_split", "min_voxels")


# ---------------------------------------------------------------------------------------------
# Batches (training_data.py: the sources, Dataset and sampler).
# ---------------------------------------------------------------------------------------------


def _epoch_torch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed for dropout in one epoch on one rank, so a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _flips(n_images: int, seed: int, epoch: int, source: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 2, source]).random(n_images) < 0.5


def fit_rows(source, settings: TrainSettings) -> np.ndarray:
    """The rows a model is fine-tuned on: the train split, or train + val (fit_split='train+val')."""
    if settings.fit_split == "train+val":
        return np.concatenate([source.split["train"], source.split["val"]])
    return np.asarray(source.split["train"])


def make_loaders(sources, settings: TrainSettings, runtime: Runtime):
    """(train loader, val loader) over the sources' image caches: this rank's share of each global batch."""
    dataset = training_data.ImageRows([s.images for s in sources])
    world = dict(num_replicas=runtime.world_size, rank=runtime.rank)
    train = training_data.GlobalBatchSampler(dataset, [fit_rows(s, settings) for s in sources], settings.batch_size,
                                             settings.seed, shuffle=True, order=settings.subject_order,
                                             batching=settings.batching, **world)
    val = training_data.GlobalBatchSampler(dataset, [s.split["val"] for s in sources], settings.batch_size,
                                           settings.seed, shuffle=False, **world)
    return (training_data.make_loader(dataset, train, runtime.device, settings.loader_workers),
            training_data.make_loader(dataset, val, runtime.device, settings.loader_workers))


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


def read_done(run_dir) -> dict | None:
    """The summary of a finished run (run_dir/done.json), or None if it has not finished."""
    path = paths.done_file(run_dir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise options.DataError(f"{path}: unreadable ({err}); delete it to retrain the model") from None


def restore_or_init(method: str, sources, run_dir: Path, settings: TrainSettings, image_size: int,
                    runtime: Runtime) -> RunState:
    """A seeded new model, optimizer and LR schedule, or all of them restored exactly from run_dir/last.pt."""
    device = runtime.device
    torch.manual_seed(settings.seed)
    spec = models.model_spec(method, [len(s.voxel_indices) for s in sources], settings.backbone, settings.h_method)
    model = models.model_from_spec(spec, settings.weights, settings.dropout).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    adam_kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, **adam_kwargs)
    scheduler = None if settings.lr_schedule == "none" else torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience)
    state = RunState(model, optimizer, scheduler, history=[])
    last_path = paths.checkpoint_file(run_dir, "last")
    if settings.resume and last_path.is_file():
        ckpt = models.load_checkpoint(last_path)
        _check_resumable(last_path, ckpt, method, settings, sources, image_size)
        if ckpt["epoch"] >= settings.epochs:  # finished, but killed before done.json was written
            state.finished_summary = _summary(method, sources, "done", ckpt["metrics"], ckpt.get("best"))
            return state
        if "optimizer" not in ckpt:
            raise options.DataError(f"{last_path}: saved without optimizer state; it cannot be extended from "
                                    f"{ckpt['epoch']} to {settings.epochs} epochs; retrain with --resume=false")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state.start_epoch, state.history, state.best = ckpt["epoch"], ckpt["metrics"], ckpt.get("best")
        state.status = "resumed"
    elif runtime.is_main:
        paths.done_file(run_dir).unlink(missing_ok=True)  # a fresh run is not finished until it says so
    return state


def train_one_epoch(method: str, train_model: nn.Module, optimizer, loader, fmri: list, epoch: int,
                    settings: TrainSettings, runtime: Runtime) -> dict:
    """One pass over this epoch's seeded global batches (each rank its share) -> mean loss and timings."""
    from tqdm import tqdm
    device = runtime.device
    t_epoch = time.perf_counter()
    loader.batch_sampler.set_epoch(epoch)
    plan = loader.batch_sampler.global_batches()
    flips = [_flips(len(c), settings.seed, epoch, k) for k, c in enumerate(loader.dataset.caches)] \
        if settings.hflip else None
    torch.manual_seed(_epoch_torch_seed(settings.seed, epoch, runtime.rank))
    train_model.train()
    mean, std = models.normalisation(train_model)
    loss_sum = torch.zeros((), device=device)
    n_images, data_s = 0, 0.0
    batches = zip(plan, training_data.read_batches(loader), strict=True)
    t_wait = time.perf_counter()
    for (source, global_rows), batch in tqdm(batches, total=len(plan), desc=f"epoch {epoch}", unit="batch",
                                             leave=False, disable=not runtime.is_main):
        rows = batch["rows"].to(device, non_blocking=True)
        flip = None if flips is None else flips[source][batch["rows"].numpy()]
        x = prepare_images(batch["images"], device, settings.channels_last, flip, mean, std)
        y = fmri[source][rows]
        data_s += time.perf_counter() - t_wait  # waiting for the batch, and moving it to the device
        with autocast_context(device, settings.amp, settings.cpu_bf16):
            loss_back, loss_value = models.batch_loss(method, train_model, x, y, settings.temperature,
                                                      settings.symmetric_loss, source)
        optimizer.zero_grad(set_to_none=True)
        loss_back.backward()
        optimizer.step()
        loss_sum += loss_value * len(global_rows)
        n_images += len(global_rows)
        t_wait = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t_epoch
    return {"train_loss": loss_sum.item() / n_images, "train_images_per_s": n_images / train_s,
            "data_s": data_s, "train_s": train_s}


@torch.no_grad()
def evaluate(method: str, model: nn.Module, loader, fmri: list, settings: TrainSettings,
             runtime: Runtime) -> list[dict]:
    """Per source, on its val batches: val loss and quality (CL: top-1 fMRI->image retrieval among its val images;
    reg: mean voxel Pearson r).

    Dropout is off; CL's BatchNorm uses each val batch's own statistics per modality, as training does (its
    running statistics, blended from both modalities, are left untouched), so the val loss is the training
    objective on held-out batches.
    """
    model = getattr(model, "module", model)
    device = runtime.device
    sampler = loader.batch_sampler
    outs = [[] for _ in fmri]
    losses = [[] for _ in fmri]
    mean, std = models.normalisation(model)
    with models.batch_statistics(model), autocast_context(device, settings.amp, settings.cpu_bf16):
        for (source, global_rows), batch in zip(sampler.global_batches(), training_data.read_batches(loader),
                                                strict=True):
            x = prepare_images(batch["images"], device, settings.channels_last, None, mean, std)
            y = fmri[source][batch["rows"].to(device, non_blocking=True)]
            if method == "cl":
                f, g = model(x, y, source)
                f, g = models.gather_rows(f.float()), models.gather_rows(g.float())
                loss = models.contrastive_loss(f, g, settings.temperature, settings.symmetric_loss)
                losses[source].append(len(global_rows) * loss.item())
                outs[source].append((f, g))
            else:
                outs[source].append(models.gather_rows(model(x, source).float()))
    results = []
    for source, source_outs in enumerate(outs):
        rows = torch.as_tensor(sampler.rows_per_source[source], device=device)  # sorted, as the batches
        if method == "cl":
            f = F.normalize(torch.cat([o[0] for o in source_outs]), dim=1)
            g = F.normalize(torch.cat([o[1] for o in source_outs]), dim=1)
            top1 = ((f @ g.T).argmax(1) == torch.arange(len(f), device=device)).float().mean().item()
            results.append({"val_loss": sum(losses[source]) / len(rows), "val_top1": top1})
        else:
            pred, target = torch.cat(source_outs), fmri[source][rows]
            val_r = encoding.pearson_r(target.double().cpu().numpy(), pred.double().cpu().numpy())
            results.append({"val_loss": F.mse_loss(pred, target).item(), "val_r": float(np.nanmean(val_r))})
    return results


def save_epoch(state: RunState, run_dir: Path, row: dict, t_epoch: float, method: str, settings: TrainSettings,
               sources, image_size: int, script_options: dict, runtime: Runtime) -> bool:
    """Record one epoch: best.pt when val loss improved (in settings.checkpoint_dtype), last.pt (the exact resume
    point; after the final epoch only with keep_last) and log.csv. -> improved."""
    metric_name = VAL_METRIC[method]
    improved = state.best is None or row["val_loss"] < state.best["val_loss"]
    if improved:
        state.best = {"epoch": row["epoch"], "val_loss": row["val_loss"], metric_name: row[metric_name]}
    finished = row["epoch"] == settings.epochs
    meta = {"method": method, "settings": asdict(settings), "best": state.best, "done": finished,
            "image_size": int(image_size), "n_train": [len(fit_rows(s, settings)) for s in sources],
            "n_val": [len(s.split["val"]) for s in sources]}
    where = dict(roi_voxel_indices=[s.voxel_indices for s in sources], subjects=[s.subject for s in sources])
    if runtime.is_main and improved:
        models.save_checkpoint(paths.checkpoint_file(run_dir, "best"), state.model, None, None, row["epoch"],
                               script_options, metrics=state.history + [row], weights_dtype=settings.checkpoint_dtype,
                               **where, **meta)
    row["epoch_s"] = time.perf_counter() - t_epoch  # training, validation and checkpoint writing
    state.history.append(row)
    if runtime.is_main:
        # a run killed after this epoch but before done.json resumes from the previous last.pt and redoes it
        if not finished or settings.keep_last:
            models.save_checkpoint(paths.checkpoint_file(run_dir, "last"), state.model, state.optimizer,
                                   state.scheduler, row["epoch"], script_options, metrics=state.history, **where,
                                   **meta)
        outputs.save_csv(paths.log_file(run_dir), state.history, script_options)
    return improved


def train_roi_model(method: str, sources, run_dir, settings: TrainSettings, script_options: dict | None = None,
                    runtime: Runtime | None = None, desc: str = "") -> dict:
    """Fine-tune one ROI model (CL or reg) on the sources' train splits, selecting on their val splits.

    sources: one Source (a per-subject model) or several (a model pooled over subjects, one batch from one
    subject at a time). Writes run_dir/{best,last}.pt, log.csv and, when finished, done.json (rank 0 only);
    the val loss and metric are the means over subjects (per subject too in log.csv when pooled). With
    settings.resume, continues from last.pt exactly. Returns a summary row.
    """
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm
    models.check_method(method)
    runtime = runtime or setup_runtime("auto")
    device, world = runtime.device, runtime.world_size
    run_dir = Path(run_dir)
    script_options = dict(script_options or {})
    metric_name = VAL_METRIC[method]
    sources = list(sources)
    _check_trainable(run_dir, method, sources, settings, world)
    image_size = int(sources[0].images.shape[-1])
    models.check_image_size(settings.backbone, settings.weights, image_size)

    done = read_done(run_dir) if settings.resume else None
    if done is not None and done.get("epochs", 0) >= settings.epochs:
        return {**done, "status": "done"}
    if done is not None and not paths.checkpoint_file(run_dir, "last").is_file():
        raise options.DataError(f"{run_dir}: finished after {done.get('epochs')} epochs without last.pt (keep_last="
                                f"false), so it cannot be extended to {settings.epochs}; retrain with --resume=false")
    state = restore_or_init(method, sources, run_dir, settings, image_size, runtime)
    if state.finished_summary is not None:
        if runtime.is_main:
            _finish(run_dir, state.finished_summary, settings, script_options)
        runtime.barrier()
        return state.finished_summary
    train_model = state.model
    if world > 1:
        # buffers (BatchNorm running stats) stay equal on every rank without syncing them each step:
        # DistBatchNorm1d uses global statistics; pooled: each step uses one subject's projection, the same
        # subject on every rank
        train_model = DistributedDataParallel(state.model, forward_sync_buffers=False,
                                              device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=len(sources) > 1)

    fmri = [torch.from_numpy(np.ascontiguousarray(s.fmri, dtype=np.float32)).to(device) for s in sources]
    train_loader, val_loader = make_loaders(sources, settings, runtime)
    names = [paths.subject_dir_name(s.subject) for s in sources]
    epoch_bar = tqdm(total=settings.epochs, initial=state.start_epoch, desc=desc or f"{method} {run_dir.name}",
                     unit="epoch", disable=not runtime.is_main)
    for epoch in range(state.start_epoch + 1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        train = train_one_epoch(method, train_model, state.optimizer, train_loader, fmri, epoch, settings, runtime)
        t_val = time.perf_counter()
        val = evaluate(method, state.model, val_loader, fmri, settings, runtime)
        val_loss = float(np.mean([v["val_loss"] for v in val]))
        lr_used = state.optimizer.param_groups[0]["lr"]
        if state.scheduler is not None:
            state.scheduler.step(val_loss)
        row = {"epoch": epoch, "train_loss": train["train_loss"], "val_loss": val_loss,
               metric_name: float(np.mean([v[metric_name] for v in val])), "lr": lr_used,
               "train_images_per_s": train["train_images_per_s"], "data_s": train["data_s"],
               "train_s": train["train_s"], "val_s": time.perf_counter() - t_val}
        if len(sources) > 1:
            for name, v in zip(names, val):
                row.update({f"val_loss_{name}": v["val_loss"], f"{metric_name}_{name}": v[metric_name]})
        save_epoch(state, run_dir, row, t_epoch, method, settings, sources, image_size, script_options, runtime)
        epoch_bar.update(1)
        epoch_bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}",
                              **{metric_name: f"{row[metric_name]:.3f}"}, lr=f"{lr_used:.1e}",
                              img_s=f"{row['train_images_per_s']:.0f}")
        if settings.stop_after_epoch and epoch >= settings.stop_after_epoch and epoch != settings.epochs:
            state.status = "stopped"
            break
    epoch_bar.close()
    summary = _summary(method, sources, state.status, state.history, state.best)
    if runtime.is_main and state.history and state.history[-1]["epoch"] == settings.epochs:
        _finish(run_dir, summary, settings, script_options)
    runtime.barrier()
    return summary


def _finish(run_dir, summary: dict, settings: TrainSettings, script_options: dict) -> None:
    """done.json, then (unless keep_last) last.pt goes: a finished model keeps one checkpoint, best.pt."""
    outputs.save_json(paths.done_file(run_dir), summary, script_options)
    if not settings.keep_last:
        paths.checkpoint_file(run_dir, "last").unlink(missing_ok=True)


def _check_trainable(run_dir, method, sources, settings, world):
    if not sources:
        raise options.DataError(f"{run_dir}: no subjects to train on")
    for s in sources:
        n_train, n_val = len(s.split["train"]), len(s.split["val"])
        if n_train < 2 * world or n_val < 2 * world:
            raise options.DataError(f"{run_dir}: subject {s.subject} has {n_train} training and {n_val} validation "
                                  f"images; need at least {2 * world} of each ({world} ranks)")
        if s.images.shape[-1] != sources[0].images.shape[-1]:
            raise options.DataError(f"{run_dir}: image caches of different sizes ({s.images.shape[-1]} and "
                                  f"{sources[0].images.shape[-1]} px)")
    if settings.batch_size < max(3, 2 * world):  # near-equal batches of >= 3 never leave a BatchNorm 1 row
        raise options.DataError(f"batch_size={settings.batch_size}: need at least 3 and 2 images per rank "
                              f"({world} ranks)")
    if method == "cl" and settings.temperature is None:
        raise options.DataError("CL training needs a temperature (cl_model_training.py's option)")
    if settings.lr_schedule not in LR_SCHEDULES:
        raise options.DataError(f"lr_schedule={settings.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if settings.batching not in training_data.BATCHINGS:
        raise options.DataError(f"batching={settings.batching!r}: expected one of {', '.join(training_data.BATCHINGS)}")
    if settings.fit_split not in FIT_SPLITS:
        raise options.DataError(f"fit_split={settings.fit_split!r}: expected one of {', '.join(FIT_SPLITS)}")
    if settings.fit_split == "train+val" and (settings.lr_schedule != "none" or not settings.keep_last):
        raise options.DataError("fit_split=train+val fine-tunes on the val images too, so nothing held out can select "
                                "an epoch: it needs lr_schedule=none and keep_last=true (use checkpoint=last later)")
    if settings.checkpoint_dtype not in CHECKPOINT_DTYPES:
        raise options.DataError(f"checkpoint_dtype={settings.checkpoint_dtype!r}: expected one of "
                                f"{', '.join(CHECKPOINT_DTYPES)}")
    if settings.subject_order not in training_data.ORDERS:
        raise options.DataError(f"subject_order={settings.subject_order!r}: expected one of "
                              f"{', '.join(training_data.ORDERS)}")


def _summary(method, sources, status, history, best) -> dict:
    metric_name = VAL_METRIC[method]
    subjects = {"subjects": " ".join(str(s.subject) for s in sources)} if len(sources) > 1 else {}
    return {"method": method, **subjects, "voxels": int(sum(len(s.voxel_indices) for s in sources)),
            "status": status, "epochs": history[-1]["epoch"] if history else 0,
            "best_epoch": best["epoch"] if best else None,
            "best_val_loss": best["val_loss"] if best else None,
            f"best_{metric_name}": best[metric_name] if best else None,
            "minutes": sum(r["epoch_s"] for r in history) / 60}


def _check_resumable(path, ckpt, method, settings, sources, image_size):
    saved = ckpt.get("settings", {})
    backbones.check_same_backbone(path, ckpt["model_spec"].get("backbone"), settings.backbone)
    if ckpt.get("method") != method:
        raise options.DataError(f"{path}: a {ckpt.get('method')} checkpoint, cannot resume it as {method}")
    if ckpt.get("subjects") != [s.subject for s in sources]:
        raise options.DataError(f"{path}: trained on subjects {ckpt.get('subjects')}, now "
                              f"{[s.subject for s in sources]}; retrain with --resume=false")
    if not all(np.array_equal(a.numpy(), s.voxel_indices) for a, s in zip(ckpt["roi_voxel_indices"], sources)):
        raise options.DataError(f"{path}: trained on other voxels than this ROI has now; retrain with --resume=false")
    if ckpt.get("image_size") != image_size:
        raise options.DataError(f"{path}: trained at {ckpt.get('image_size')} px, now {image_size} px")
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(settings, k)!r}" for k in _RESUME_KEYS
               if saved.get(k) != getattr(settings, k)]
    if changed:
        raise options.DataError(f"{path}: cannot resume with changed settings ({'; '.join(changed)}); restore them "
                              "or retrain with --resume=false")


# ---------------------------------------------------------------------------------------------
# Sweeps over ROIs and hemispheres.
# ---------------------------------------------------------------------------------------------


def parse_shard(text) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n): take every n-th job starting at job i."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise options.DataError(f"--shard={text}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise options.DataError(f"--shard={text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def sweep_jobs(hemispheres, rois, seeds=(0,), shard=(0, 1)) -> list[tuple[str, str, int]]:
    """(hemisphere, ROI, seed) jobs of a sweep ([] rois = all 31), this shard's share: jobs[i::n]."""
    hemispheres = [utils.check_hemisphere(h) for h in (hemispheres or utils.HEMISPHERES)]
    rois = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)
    jobs = [(h, r, int(s)) for h in hemispheres for r in rois for s in check_seeds(seeds)]
    i, n = shard
    return jobs[i::n]


def check_seeds(seeds) -> list[int]:
    """The `seeds` option: distinct non-negative integers, at least one."""
    seeds = [int(s) for s in seeds]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise options.OptionsError(f"--seeds={seeds}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds
