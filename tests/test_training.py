"""Training: batches, validation, learning the tiny data's signal, exact resume, sweeps, torchrun, pooled models.

The models use the small stand-in backbone (backbone="tiny"): what is under test (batches, the loop, resume,
validation, pooling) does not depend on AlexNet.
"""
from __future__ import annotations

import copy
import csv
import math
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
import models
import options
import paths
import runtime
import training
import training_data
import utils
from conftest import default_settings, make_tiny_dataset, run_script
from test_models import reference_cl_loss

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # the PNG size; the tiny backbone takes any size >= 4 px
# float32 on CPU (cpu_bf16=False) so runs can be compared to tight tolerances
FAST = default_settings("cl", epochs=3, batch_size=12, lr=1e-3, backbone="tiny", weights="none",
                                 dropout=0.0, cpu_bf16=False)
COMMON_ARGS = ["--weights=none", "--backbone=tiny", f"--image_size={SIZE}", "--batch_size=12", "--num_threads=1",
               "--cpu_bf16=false", "--device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny 3-subject dataset, its splits and 32 px image caches in a shared out_dir, loaded once for the module."""
    root = tmp_path_factory.mktemp("training")
    data_dir = make_tiny_dataset(root / "data", subjects=(1, 2, 3))
    out_dir = root / "out"
    data = {s: utils.load_subject(data_dir, s, out_dir, SIZE, hemispheres=["lh"]) for s in (1, 2, 3)}
    return {"root": root, "data_dir": data_dir, "out_dir": out_dir, "data": data,
            "runtime": runtime.setup_runtime("cpu")}


def read_log(run_dir) -> list[dict]:
    with open(Path(run_dir) / "log.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def sources_of(tiny, roi, subjects=(1,)):
    return [training_data.roi_source(tiny["data"][s], "lh", roi, 20) for s in subjects]


def train(tiny, method, roi, run_dir, settings, subjects=(1,)):
    return training.train_roi_model(method, sources_of(tiny, roi, subjects), run_dir, settings, {"test": True},
                                    tiny["runtime"])


# ---- batches ----


def test_batches_depend_on_seed_and_epoch_cover_every_image_once_and_split_over_ranks():
    caches = [np.zeros((n, 1, 1, 1), dtype=np.uint8) for n in (50, 30, 7)]
    dataset = training_data.ImageRows(caches)
    rows = [np.arange(3, 40), np.arange(0, 30, 2), np.arange(7)]

    def batches(epoch, order="interleaved", seed=0):
        sampler = training_data.GlobalBatchSampler(dataset, rows, 10, seed, order=order)
        sampler.set_epoch(epoch)
        return sampler.global_batches()

    for epoch in (1, 2):
        plan = batches(epoch)
        assert len(plan) == 4 + 2 + 1
        for source, source_rows in enumerate(rows):
            mine = [b for s, b in plan if s == source]
            sizes = [len(b) for b in mine]  # ceil(n / 10) near-equal batches, none larger than 10
            assert len(mine) == math.ceil(len(source_rows) / 10) and max(sizes) <= 10 and max(sizes) - min(sizes) <= 1
            assert np.array_equal(np.sort(np.concatenate(mine)), source_rows)  # every image exactly once
            assert all(np.array_equal(b, np.sort(b)) for b in mine)           # sorted reads
    same = lambda a, b: len(a) == len(b) and all(s == t and np.array_equal(x, y) for (s, x), (t, y) in zip(a, b))
    assert same(batches(3), batches(3))
    assert not same(batches(3), batches(4)) and not same(batches(3), batches(3, seed=1))
    # interleaved: the sources' batches mixed; sequential: the same batches, source 0's first, then 1's, then 2's
    orders = [[s for s, _ in batches(e)] for e in range(1, 6)]
    assert any(o != sorted(o) for o in orders)
    for epoch in (1, 2):
        sequential = batches(epoch, "sequential")
        assert [s for s, _ in sequential] == [0, 0, 0, 0, 1, 1, 2]
        assert same(sequential, sorted(batches(epoch), key=lambda sb: sb[0]))
    # ranks: each yields its part of every global batch; the parts, in rank order, are the global batch
    for world in (2, 3):
        samplers = [training_data.GlobalBatchSampler(dataset, rows, 10, 0, num_replicas=world, rank=r)
                    for r in range(world)]
        for s in samplers:
            s.set_epoch(1)
        parts = [list(s) for s in samplers]
        assert all(len(p) == len(s) == 7 for p, s in zip(parts, samplers))
        for k, (source, global_rows) in enumerate(batches(1)):
            joined = np.concatenate([parts[r][k] for r in range(world)])
            assert np.array_equal(joined, dataset.flat_indices(source, global_rows))
            assert max(len(parts[r][k]) for r in range(world)) - min(len(parts[r][k]) for r in range(world)) <= 1


def test_image_rows_reads_batches_and_reopens_memmaps_when_pickled(tmp_path):
    rng = np.random.default_rng(0)
    cache = np.lib.format.open_memmap(tmp_path / "cache.npy", mode="w+", dtype=np.uint8, shape=(20, 3, 4, 4))
    cache[:] = rng.integers(0, 256, cache.shape, dtype=np.uint8)
    cache.flush()
    on_disk = np.load(tmp_path / "cache.npy", mmap_mode="r")
    in_ram = rng.integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    dataset = training_data.ImageRows([on_disk, in_ram])
    batch = dataset.__getitems__(dataset.flat_indices(1, [2, 5]))
    assert batch["source"] == 1 and batch["rows"].tolist() == [2, 5]
    assert np.array_equal(batch["images"].numpy(), in_ram[[2, 5]])
    assert np.array_equal(dataset.__getitems__([3, 7])["images"].numpy(), on_disk[[3, 7]])
    assert dataset[21]["row"] == 1 and np.array_equal(dataset[21]["image"].numpy(), in_ram[1])
    with pytest.raises(ValueError, match="one source"):
        dataset.__getitems__([19, 20])
    blob = pickle.dumps(dataset)  # as sent to a spawned worker: the memmap by file name, not its bytes
    assert len(blob) < on_disk.nbytes
    copy_ = pickle.loads(blob)
    assert isinstance(copy_.caches[0], np.memmap) and np.array_equal(copy_.caches[0], on_disk)
    assert np.array_equal(copy_.caches[1], in_ram)
    # the DataLoader delivers the sampler's batches in order: in this process (read-ahead thread) or a worker
    sampler = training_data.GlobalBatchSampler(dataset, [np.arange(20), np.arange(10)], 6, seed=0)
    sampler.set_epoch(1)
    for workers in (0, 1):
        loader = training_data.make_loader(dataset, sampler, "cpu", workers)
        got = list(training_data.read_batches(loader))
        assert len(got) == len(sampler.global_batches())
        for b, (source, rows) in zip(got, sampler.global_batches()):
            assert b["source"] == source and np.array_equal(b["rows"].numpy(), rows)
            assert np.array_equal(b["images"].numpy(), dataset.caches[source][rows])


# ---- validation ----


def test_validation_is_the_training_objective_and_leaves_the_model_unchanged(tiny):
    """CL val loss = contrastive loss with BatchNorm in train mode (batch statistics per modality, computed over
    each val batch), dropout off; no buffer or parameter changes."""
    settings = replace(FAST, batch_size=4, dropout=0.5)  # several val batches; dropout must be off in validation
    sources = sources_of(tiny, "FFA-1", (1, 2))
    torch.manual_seed(0)
    model = models.build_model("cl", [len(s.voxel_indices) for s in sources], "none", 0.5, "tiny", "average")
    model.train()
    with torch.no_grad():  # running statistics away from their initial values, as after training
        for k, s in enumerate(sources):
            model(torch.randn(8, 3, SIZE, SIZE), torch.from_numpy(s.fmri[:8]), k)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, val_loader = training.make_loaders(sources, settings, tiny["runtime"])
    fmri = [torch.from_numpy(s.fmri) for s in sources]
    results = training.evaluate("cl", model, val_loader, fmri, settings, tiny["runtime"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training

    # independently: a train-mode copy without dropout on the sorted val rows cut into ceil(n / 4) near-equal batches
    reference = backbones.set_dropout(copy.deepcopy(model), 0.0).train()
    mean = np.array(runtime.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(runtime.IMAGENET_STD).reshape(1, 3, 1, 1)
    eval_copy = copy.deepcopy(model).eval()
    for k, (s, result) in enumerate(zip(sources, results)):
        rows = np.sort(s.split["val"])
        batches = np.array_split(rows, math.ceil(len(rows) / 4))
        assert len(batches) >= 2
        total, total_eval, f_all, g_all = 0.0, 0.0, [], []
        with torch.no_grad():
            for b in batches:
                x = torch.from_numpy(((s.images[b] / 255.0 - mean) / std).astype(np.float32))
                y = torch.from_numpy(s.fmri[b])
                f = reference.head(reference.fmri_proj[k](y)).double().numpy()
                g = reference.head(reference.image_proj(reference.backbone(x))).double().numpy()
                total += len(b) * reference_cl_loss(f, g, settings.temperature, "image")
                f_all.append(f), g_all.append(g)
                fe, ge = eval_copy(x, y, k)
                total_eval += len(b) * reference_cl_loss(fe.double().numpy(), ge.double().numpy(),
                                                         settings.temperature, "image")
        # float32 forward passes of the same weights on inputs normalised two ways (~1e-7 apart): 1e-5 relative
        assert result["val_loss"] == pytest.approx(total / len(rows), rel=1e-5)
        assert abs(total_eval / len(rows) - result["val_loss"]) > 1e-3  # eval mode would be another objective
        f_all, g_all = np.concatenate(f_all), np.concatenate(g_all)
        cos = (f_all / np.linalg.norm(f_all, axis=1, keepdims=True)) @ (
            g_all / np.linalg.norm(g_all, axis=1, keepdims=True)).T
        assert result["val_top1"] == pytest.approx(np.mean(cos.argmax(1) == np.arange(len(rows))))


# ---- the per-subject loop ----


@pytest.fixture(scope="module")
def cl_run(tiny):
    """CL on the colour-driven FFA-1, no dropout, 3 epochs (also the reference of the torchrun test)."""
    run_dir = tiny["root"] / "runs" / "cl_learn"
    summary = train(tiny, "cl", "FFA-1", run_dir, FAST)
    return run_dir, summary


def test_cl_and_reg_learn_the_signal_roi(tiny, cl_run):
    run_dir, summary = cl_run
    log = read_log(run_dir)
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert all(0 <= row["val_top1"] <= 1 and row["train_images_per_s"] > 0 for row in log)
    assert summary["status"] == "trained" and summary["epochs"] == 3 and summary["voxels"] == 30
    best_epoch = int(min(log, key=lambda r: r["val_loss"])["epoch"])
    assert summary["best_epoch"] == best_epoch
    assert models.load_checkpoint(run_dir / "best.pt")["epoch"] == best_epoch
    assert not (run_dir / "last.pt").exists()  # a finished model keeps one checkpoint (keep_last=false)
    best = models.load_checkpoint(run_dir / "best.pt")
    assert best["subjects"] == [1] and best["model_spec"]["hidden"] == 24 and "optimizer" not in best
    assert training.read_done(run_dir)["epochs"] == 3

    reg_dir = tiny["root"] / "runs" / "reg_learn"
    train(tiny, "reg", "FFA-1", reg_dir, replace(FAST, epochs=2, keep_last=True))
    assert "optimizer" in models.load_checkpoint(reg_dir / "last.pt")  # kept whole: the run can be extended
    reg_log = read_log(reg_dir)
    assert reg_log[-1]["train_loss"] < reg_log[0]["train_loss"]
    # deterministic check (no dropout, no BatchNorm): training-set MSE of the tuned model < of the initial one
    fmri, _ = training_data.roi_fmri(tiny["data"][1], "lh", "FFA-1", 20)
    rows = tiny["data"][1].split["train"]
    x = runtime.prepare_images(tiny["data"][1].images[rows], "cpu")
    y = torch.from_numpy(fmri[rows])
    torch.manual_seed(FAST.seed)
    initial = models.build_model("reg", 30, "none", 0.0, "tiny").eval()
    tuned = models.load_roi_model(reg_dir / "last.pt")
    with torch.no_grad():
        assert torch.mean((tuned(x) - y) ** 2) < torch.mean((initial(x) - y) ** 2)


def expected_plateau_lrs(val_losses, lr, factor, patience, threshold=1e-4):
    """ReduceLROnPlateau (mode min, relative threshold, no cooldown) written out: the lr each epoch used."""
    lrs, best, bad = [], math.inf, 0
    for loss in val_losses:
        lrs.append(lr)
        if loss < best * (1 - threshold):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            lr, bad = lr * factor, 0
    return lrs


def test_lr_schedules_plateau_and_none(tiny):
    settings = replace(FAST, epochs=4, lr=3e-2, lr_patience=0, lr_factor=0.5)  # a large lr: val loss goes up
    plateau_dir, none_dir = tiny["root"] / "runs" / "plateau", tiny["root"] / "runs" / "none"
    train(tiny, "reg", "V1v", plateau_dir, settings)
    train(tiny, "reg", "V1v", none_dir, replace(settings, lr_schedule="none"))
    plateau, constant = read_log(plateau_dir), read_log(none_dir)
    assert [r["lr"] for r in plateau] == pytest.approx(expected_plateau_lrs([r["val_loss"] for r in plateau],
                                                                            3e-2, 0.5, 0))
    assert len({r["lr"] for r in plateau}) > 1 and [r["lr"] for r in constant] == [3e-2] * 4
    with pytest.raises(options.DataError, match="lr_schedule"):
        train(tiny, "reg", "V1v", tiny["root"] / "runs" / "bad", replace(settings, lr_schedule="cosine"))


def test_resume_equals_uninterrupted_run(tiny):
    settings = replace(FAST, epochs=2, dropout=0.5, hflip=True, loader_workers=1,  # dropout and flips: RNG matters
                       keep_last=True)
    whole, parts = tiny["root"] / "runs" / "whole", tiny["root"] / "runs" / "parts"
    train(tiny, "cl", "V1v", whole, settings)
    first = train(tiny, "cl", "V1v", parts, replace(settings, stop_after_epoch=1))
    assert first["status"] == "stopped" and first["epochs"] == 1 and training.read_done(parts) is None
    second = train(tiny, "cl", "V1v", parts, replace(settings, resume=True, loader_workers=0))
    assert second["status"] == "resumed" and second["epochs"] == 2
    a, b = models.load_checkpoint(whole / "last.pt"), models.load_checkpoint(parts / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    timings = ("train_images_per_s", "data_s", "train_s", "val_s", "epoch_s")
    assert [{k: v for k, v in r.items() if k not in timings} for r in read_log(whole)] == \
        [{k: v for k, v in r.items() if k not in timings} for r in read_log(parts)]
    # a finished run resumes as done; changed settings refuse to resume
    assert train(tiny, "cl", "V1v", parts, replace(settings, resume=True))["status"] == "done"
    (parts / "done.json").unlink()
    with pytest.raises(options.DataError, match="changed settings"):
        train(tiny, "cl", "V1v", parts, replace(settings, resume=True, epochs=3, lr=1e-2))


def test_small_and_empty_rois_are_refused(tiny):
    data = tiny["data"][1]
    small = replace(data, roi_voxel_indices={"lh": {**data.roi_voxel_indices["lh"],
                                                    "V1v": data.roi_voxel_indices["lh"]["V1v"][:12]}})
    with pytest.raises(options.DataError, match="12 voxels; training needs at least 20"):
        training_data.roi_fmri(small, "lh", "V1v", 20)
    proc = subprocess.run([sys.executable, str(REPO / "cl_model_training.py"), f"--data_dir={tiny['data_dir']}",
                           f"--out_dir={tiny['out_dir']}", "--roi=mTL-faces", *COMMON_ARGS],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "mTL-faces: subject 1 has 0 voxels" in lines[0]
    assert not (Path(tiny["out_dir"]) / "models" / "cl" / "subj01" / "lh" / "mTL-faces").exists()


def run_sweep(tiny, *extra):
    run_script("reg_model_training_all_rois.py", f"--data_dir={tiny['data_dir']}", f"--out_dir={tiny['out_dir']}",
               "--hemispheres=lh", "--rois=V1v,mTL-faces,PPA", "--epochs=2", "--dropout=0", *COMMON_ARGS, *extra)
    with open(paths.sweep_summary_file(tiny["out_dir"], "reg", subject=1, backbone="tiny")) as fh:
        return {row["roi"]: row for row in csv.DictReader(fh)}


def test_sweep_skips_small_rois_resumes_and_skips_finished(tiny):
    killed = run_sweep(tiny, "--stop_after_epoch=1")  # as if the sweep were killed after epoch 1 of each ROI
    assert killed["mTL-faces"]["status"].startswith("skipped: subject 1: 0 voxels")
    assert killed["V1v"]["status"] == killed["PPA"]["status"] == "stopped"
    assert killed["V1v"]["voxels"] == "30" and killed["V1v"]["epochs"] == "1"
    run_dirs = {roi: paths.model_dir(tiny["out_dir"], "reg", "lh", roi, subject=1, backbone="tiny")
                for roi in ("V1v", "PPA")}
    resumed = run_sweep(tiny)
    assert resumed["V1v"]["status"] == resumed["PPA"]["status"] == "resumed"
    assert resumed["PPA"]["epochs"] == "2" and float(resumed["PPA"]["best_val_r"]) == pytest.approx(
        training.read_done(run_dirs["PPA"])["best_val_r"])
    assert [row["epoch"] for row in read_log(run_dirs["V1v"])] == [1, 2]
    assert all(not (d / "last.pt").exists() and (d / "best.pt").is_file() for d in run_dirs.values())
    stamps = {roi: (d / "best.pt").stat().st_mtime_ns for roi, d in run_dirs.items()}
    again = run_sweep(tiny)
    assert again["V1v"]["status"] == again["PPA"]["status"] == "done"
    assert stamps == {roi: (d / "best.pt").stat().st_mtime_ns for roi, d in run_dirs.items()}
    # finished without last.pt: extending it is one clear line, not a silent retraining
    with pytest.raises(options.DataError, match="keep_last"):
        run_sweep(tiny, "--epochs=3")


def test_training_script_under_torchrun_matches_single_process(tiny):
    """cl_model_training.py unchanged on 2 CPU ranks (gloo) vs one process, one global batch of every image.

    The first epoch's train loss is the loss at the initial weights: DDP equals one process up to float32
    rounding (tests/test_models.py bounds it). After the first Adam step, whose update is ~lr * sign(gradient)
    per weight, a rounding-level gradient near 0 can flip a sign: so weights may differ by up to 2 lr, and the
    val loss after that step only loosely.
    """
    settings = replace(FAST, epochs=3, stop_after_epoch=1, batch_size=64, lr=1e-4)  # one batch per epoch
    single_dir = tiny["root"] / "runs" / "single_for_ddp"
    train(tiny, "cl", "FFA-1", single_dir, settings)
    out_dir = tiny["root"] / "ddp_out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "cl_model_training.py"), f"--data_dir={tiny['data_dir']}",
                           f"--out_dir={out_dir}", "--roi=FFA-1", "--epochs=3", "--stop_after_epoch=1",
                           "--dropout=0", "--lr=1e-4", *COMMON_ARGS, "--batch_size=64"], capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = paths.model_dir(out_dir, "cl", "lh", "FFA-1", subject=1, backbone="tiny")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "last.pt", "log.csv", "meta"]
    ddp_row, single_row = read_log(run_dir)[0], read_log(single_dir)[0]
    assert ddp_row["train_loss"] == pytest.approx(single_row["train_loss"], rel=1e-5)
    assert ddp_row["val_loss"] == pytest.approx(single_row["val_loss"], rel=1e-3)
    a = models.load_checkpoint(run_dir / "last.pt")["model"]
    b = models.load_checkpoint(single_dir / "last.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 2 * settings.lr + 1e-6


# ---- pooled models ----


@pytest.mark.parametrize("method", ["cl", "reg"])
def test_pooled_model_on_one_subject_equals_the_per_subject_model(method):
    """Same weights copied: the per-subject model's loss and update = the pooled model's on that subject's batches,
    and a batch of one subject leaves the other subjects' projections alone."""
    torch.manual_seed(0)
    single = models.build_model(method, 30, "none", 0.0, "tiny").train()
    pooled = models.model_from_spec({**single.spec, "n_voxels": [30, 20]}, "none", 0.0).train()
    assert type(pooled) is type(single)
    state = pooled.state_dict()
    state.update(copy.deepcopy(single.state_dict()))  # shared parts and subject 1's projection / read-out
    pooled.load_state_dict(state)
    other = {k: v.clone() for k, v in pooled.state_dict().items() if k.startswith(("fmri_proj.1.", "readout.1."))}
    assert other
    x, y = torch.randn(12, 3, SIZE, SIZE), torch.randn(12, 30)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (single, pooled)]
    losses = []
    for model, optimizer in zip((single, pooled), optimizers):
        loss, value = models.batch_loss(method, model, x, y, 0.3, False, 0)
        loss.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[0] == losses[1]
    after = pooled.state_dict()
    for key, value in single.state_dict().items():
        assert torch.equal(value, after[key]), key
    assert all(torch.equal(v, after[k]) for k, v in other.items())


def test_pooled_batches_interleave_deterministically_and_cover_every_train_image_once(tiny, monkeypatch):
    seen = []
    read_batches = training_data.read_batches

    def recording(loader):
        for batch in read_batches(loader):
            if loader.batch_sampler.shuffle:  # training batches
                seen.append((loader.batch_sampler.epoch, batch["source"], batch["rows"].numpy().copy()))
            yield batch
    monkeypatch.setattr(training_data, "read_batches", recording)
    sources = sources_of(tiny, "PPA", (1, 2, 3))
    for order in ("sequential", "interleaved"):
        seen.clear()
        settings = replace(FAST, epochs=2, pooled=True, pooled_h_method="average", subject_order=order)
        training.train_roi_model("cl", sources, tiny["root"] / "runs" / f"order_{order}", settings, {},
                                 tiny["runtime"])
        for epoch in (1, 2):
            batches = [(s, rows) for e, s, rows in seen if e == epoch]
            for k, source in enumerate(sources):  # every train image of every subject exactly once per epoch
                mine = np.concatenate([rows for s, rows in batches if s == k])
                assert np.array_equal(np.sort(mine), np.sort(source.split["train"]))
            labels = [s for s, _ in batches]
            assert (labels == sorted(labels)) == (order == "sequential"), (order, labels)
        if order == "interleaved":
            sampler = training_data.GlobalBatchSampler(training_data.ImageRows([s.images for s in sources]),
                                                       [s.split["train"] for s in sources], settings.batch_size,
                                                       settings.seed)
            sampler.set_epoch(1)
            assert [(s, rows.tolist()) for e, s, rows in seen if e == 1] == \
                [(s, rows.tolist()) for s, rows in sampler.global_batches()]  # a function of (seed, epoch)


def test_pooled_resume_equals_uninterrupted_run_and_logs_each_subject(tiny):
    settings = replace(FAST, epochs=2, dropout=0.5, hflip=True, pooled=True, pooled_h_method="average",
                       keep_last=True)
    whole, parts = tiny["root"] / "runs" / "pooled_whole", tiny["root"] / "runs" / "pooled_parts"
    summary = train(tiny, "cl", "FFA-1", whole, settings, (1, 2))
    assert summary["subjects"] == "1 2" and summary["voxels"] == 60
    train(tiny, "cl", "FFA-1", parts, replace(settings, stop_after_epoch=1), (1, 2))
    assert train(tiny, "cl", "FFA-1", parts, replace(settings, resume=True), (1, 2))["status"] == "resumed"
    a, b = models.load_checkpoint(whole / "last.pt"), models.load_checkpoint(parts / "last.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["subjects"] == [1, 2] and a["model_spec"]["n_voxels"] == [30, 30] and a["model_spec"]["hidden"] == 30
    log = read_log(whole)
    timings = ("train_images_per_s", "data_s", "train_s", "val_s", "epoch_s")
    assert [{k: v for k, v in r.items() if k not in timings} for r in log] == \
        [{k: v for k, v in r.items() if k not in timings} for r in read_log(parts)]
    for row in log:  # per subject, and their mean drives model selection
        assert row["val_loss"] == pytest.approx((row["val_loss_subj01"] + row["val_loss_subj02"]) / 2)
        assert row["val_top1"] == pytest.approx((row["val_top1_subj01"] + row["val_top1_subj02"]) / 2)
    with pytest.raises(options.DataError, match="subjects"):
        train(tiny, "cl", "FFA-1", parts, replace(settings, resume=True, epochs=3), (1, 3))


def test_leave_one_subject_out_never_reads_the_left_out_subject(tiny):
    """Subject 3's fMRI is replaced by garbage: the LOSO sweep without it trains, and its weights equal those
    of the single-ROI script on subjects 1 and 2 of the clean data."""
    poisoned = tiny["root"] / "poisoned_data"
    shutil.copytree(tiny["data_dir"], poisoned)
    for path in (poisoned / "subj03" / "training_split" / "training_fmri").iterdir():
        path.write_bytes(b"not an array")
    args = [*COMMON_ARGS, "--epochs=2", "--dropout=0", "--pooled_h_method=average"]
    run_script("cl_model_training_all_rois.py", f"--data_dir={poisoned}", f"--out_dir={tiny['root'] / 'loso'}",
               "--subjects=all", "--exclude_subject=3", "--hemispheres=lh", "--rois=FFA-1,mTL-faces", *args)
    run_script("cl_model_training.py", f"--data_dir={tiny['data_dir']}", f"--out_dir={tiny['root'] / 'pair'}",
               "--subjects=1,2", "--roi=FFA-1", *args)
    loso_dir = paths.model_dir(tiny["root"] / "loso", "cl", "lh", "FFA-1", exclude_subject=3, backbone="tiny",
                               pooled_h_method="average")
    loso = models.load_checkpoint(loso_dir / "best.pt")
    pair = models.load_checkpoint(paths.model_dir(tiny["root"] / "pair", "cl", "lh", "FFA-1", backbone="tiny",
                                                  pooled_h_method="average") / "best.pt")
    assert loso["subjects"] == pair["subjects"] == [1, 2] and loso["model_spec"]["hidden"] == 30  # mean of 30, 30
    assert all(torch.equal(v, pair["model"][k]) for k, v in loso["model"].items())
    with open(paths.sweep_summary_file(tiny["root"] / "loso", "cl", backbone="tiny", exclude_subject=3,
                                       pooled_h_method="average")) as fh:
        rows = {row["roi"]: row for row in csv.DictReader(fh)}
    assert rows["FFA-1"]["subjects"] == "1 2" and rows["FFA-1"]["status"] == "trained"
    assert rows["mTL-faces"]["status"].startswith("skipped: subject 1: 0 voxels, subject 2: 0 voxels")
    # the poison works: reading subject 3 fails, naming its file
    with pytest.raises(options.DataError, match="subj03.*lh_training_fmri.npy"):
        utils.load_subject(poisoned, 3, hemispheres=["lh"])


def test_remainder_batches_are_the_dataloaders_and_fit_split_needs_no_selection(tiny):
    rows = np.arange(2050)
    assert [len(b) for b in training_data.cut_batches(rows, 1024, "remainder")] == [1024, 1026]  # 2 rows join
    assert [len(b) for b in training_data.cut_batches(rows[:2000], 1024, "remainder")] == [1024, 976]
    assert [len(b) for b in training_data.cut_batches(rows[:2000], 1024, "even")] == [1000, 1000]
    source = sources_of(tiny, "FFA-1")[0]
    both = training.fit_rows(source, replace(FAST, fit_split="train+val"))
    assert sorted(both.tolist()) == sorted(source.split["train"].tolist() + source.split["val"].tolist())
    for bad in (replace(FAST, fit_split="train+val"), replace(FAST, fit_split="train+val", lr_schedule="none")):
        with pytest.raises(options.DataError, match="fit_split=train\\+val"):
            train(tiny, "reg", "FFA-1", tiny["root"] / "runs" / "fit_split", bad)
