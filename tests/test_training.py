"""Training: learning on the tiny data's signal ROIs, exact resume, ROI sweeps, small ROIs, torchrun."""
from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import features
import models
import training
import utils
from conftest import make_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # AlexNet's conv stack needs >= 63 px; the cache upsamples the 32 px PNGs
# float32 on CPU (cpu_bf16=False) so runs can be compared to tight tolerances
FAST = training.default_settings("cl", epochs=3, batch_size=12, lr=1e-4, weights="none", dropout=0.0, cpu_bf16=False)
COMMON_ARGS = ["--weights=none", f"--image_size={SIZE}", "--batch_size=12", "--num_threads=1", "--cpu_bf16=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny dataset, its split and 64 px image cache in a shared out_dir, loaded once for the module."""
    root = tmp_path_factory.mktemp("training")
    data_dir = make_tiny_dataset(root / "data", subjects=(1,))
    out_dir = root / "out"
    data = utils.load_subject(data_dir, 1, out_dir, SIZE, hemispheres=["lh"])
    return {"root": root, "data_dir": data_dir, "out_dir": out_dir, "data": data,
            "runtime": training.setup_runtime("cpu")}


def read_log(run_dir) -> list[dict]:
    with open(Path(run_dir) / "log.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def train(tiny, method, roi, run_dir, settings):
    fmri, idx = training.roi_fmri(tiny["data"], "lh", roi)
    return training.train_roi_model(method, tiny["data"].images, fmri, tiny["data"].split, idx, run_dir, settings,
                                  {"test": True}, tiny["runtime"])


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
    assert all(0 <= row["val_top1"] <= 1 and row["lr"] == 1e-4 and row["train_images_per_s"] > 0 for row in log)
    assert all(row["data_s"] < 0.1 * row["train_s"] for row in log)  # batches from the uint8 cache are cheap
    assert summary["status"] == "trained" and summary["epochs"] == 3 and summary["voxels"] == 30
    best_epoch = int(min(log, key=lambda r: r["val_loss"])["epoch"])
    assert summary["best_epoch"] == best_epoch
    assert models.load_checkpoint(run_dir / "best.pt")["epoch"] == best_epoch
    last = models.load_checkpoint(run_dir / "last.pt")
    assert last["done"] and "optimizer" not in last  # slim_finished
    assert training.read_done(run_dir)["epochs"] == 3

    reg_dir = tiny["root"] / "runs" / "reg_learn"
    train(tiny, "reg", "FFA-1", reg_dir, replace(FAST, epochs=2))
    reg_log = read_log(reg_dir)
    assert reg_log[-1]["train_loss"] < reg_log[0]["train_loss"]
    # deterministic check (no dropout, no BatchNorm): training-set MSE of the tuned model < of the initial one
    fmri, _ = training.roi_fmri(tiny["data"], "lh", "FFA-1")
    rows = tiny["data"].split["train"]
    x = features.prepare_images(tiny["data"].images[rows], "cpu")
    y = torch.from_numpy(fmri[rows])
    torch.manual_seed(FAST.seed)
    initial = models.build_model("reg", 30, "none", 0.0).eval()
    tuned = models.load_roi_model(reg_dir / "last.pt")
    with torch.no_grad():
        assert torch.mean((tuned(x) - y) ** 2) < torch.mean((initial(x) - y) ** 2)


def test_resume_equals_uninterrupted_run(tiny):
    settings = replace(FAST, epochs=2, dropout=0.5, hflip=True)  # dropout and flips: the RNG matters
    whole, parts = tiny["root"] / "runs" / "whole", tiny["root"] / "runs" / "parts"
    train(tiny, "cl", "V1v", whole, settings)
    first = train(tiny, "cl", "V1v", parts, replace(settings, stop_after_epoch=1))
    assert first["status"] == "stopped" and first["epochs"] == 1 and training.read_done(parts) is None
    second = train(tiny, "cl", "V1v", parts, replace(settings, resume=True))
    assert second["status"] == "resumed" and second["epochs"] == 2
    a, b = models.load_checkpoint(whole / "last.pt"), models.load_checkpoint(parts / "last.pt")
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6, rtol=0), key
    log_a, log_b = read_log(whole), read_log(parts)
    for ra, rb in zip(log_a, log_b):
        for key in ("train_loss", "val_loss", "val_top1", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), key
    # a finished run resumes as done; changed settings refuse to resume
    assert train(tiny, "cl", "V1v", parts, replace(settings, resume=True))["status"] == "done"
    (parts / "done.json").unlink()
    with pytest.raises(utils.DataError, match="changed settings"):
        train(tiny, "cl", "V1v", parts, replace(settings, resume=True, epochs=3, lr=1e-3))


def test_small_and_empty_rois_are_refused(tiny):
    data = tiny["data"]
    small = replace(data, roi_voxel_indices={"lh": {**data.roi_voxel_indices["lh"],
                                                    "V1v": data.roi_voxel_indices["lh"]["V1v"][:12]}})
    with pytest.raises(utils.DataError, match="12 voxels; training needs at least 20"):
        training.roi_fmri(small, "lh", "V1v")
    proc = subprocess.run([sys.executable, str(REPO / "cl_model_training.py"), f"--data_dir={tiny['data_dir']}",
                           f"--out_dir={tiny['out_dir']}", "--roi=mTL-faces", *COMMON_ARGS],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "mTL-faces: 0 voxels" in lines[0]
    assert not (Path(tiny["out_dir"]) / "models" / "cl" / "subj01" / "lh" / "mTL-faces").exists()


def run_sweep(tiny, *extra):
    proc = subprocess.run([sys.executable, str(REPO / "reg_model_training_all_rois.py"),
                           f"--data_dir={tiny['data_dir']}", f"--out_dir={tiny['out_dir']}", "--hemispheres=lh",
                           "--rois=V1v,mTL-faces,PPA", "--epochs=2", "--dropout=0", *COMMON_ARGS, *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(Path(tiny["out_dir"]) / "models" / "reg" / "subj01" / "summary.csv") as fh:
        return {row["roi"]: row for row in csv.DictReader(fh)}


def test_sweep_skips_small_rois_resumes_and_skips_finished(tiny):
    killed = run_sweep(tiny, "--stop_after_epoch=1")  # as if the sweep were killed after epoch 1 of each ROI
    assert killed["mTL-faces"]["status"].startswith("skipped: 0 voxels")
    assert killed["V1v"]["status"] == killed["PPA"]["status"] == "stopped"
    assert killed["V1v"]["voxels"] == "30" and killed["V1v"]["epochs"] == "1"
    run_dirs = {roi: models.checkpoint_path(tiny["out_dir"], "reg", 1, "lh", roi).parent for roi in ("V1v", "PPA")}
    resumed = run_sweep(tiny)
    assert resumed["V1v"]["status"] == resumed["PPA"]["status"] == "resumed"
    assert resumed["PPA"]["epochs"] == "2" and float(resumed["PPA"]["best_val_r"]) == pytest.approx(
        training.read_done(run_dirs["PPA"])["best_val_r"])
    assert [row["epoch"] for row in read_log(run_dirs["V1v"])] == [1, 2]
    stamps = {roi: (d / "last.pt").stat().st_mtime_ns for roi, d in run_dirs.items()}
    again = run_sweep(tiny)
    assert again["V1v"]["status"] == again["PPA"]["status"] == "done"
    assert stamps == {roi: (d / "last.pt").stat().st_mtime_ns for roi, d in run_dirs.items()}


def test_training_script_under_torchrun_matches_single_process(tiny):
    """cl_model_training.py unchanged on 2 CPU ranks (gloo) vs one process, one global batch of every image.

    Only the first step is compared tightly: Adam's first updates are ~lr * sign(gradient), so float32
    rounding (different thread counts do it too) moves later steps apart; tests/ddp_check.py shows the
    gradients themselves agree exactly in float64.
    """
    settings = replace(FAST, epochs=3, stop_after_epoch=1, batch_size=64)  # one batch per epoch
    single_dir = tiny["root"] / "runs" / "single_for_ddp"
    train(tiny, "cl", "FFA-1", single_dir, settings)
    out_dir = tiny["root"] / "ddp_out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "cl_model_training.py"), f"--data_dir={tiny['data_dir']}",
                           f"--out_dir={out_dir}", "--roi=FFA-1", "--epochs=3", "--stop_after_epoch=1",
                           "--dropout=0", *COMMON_ARGS, "--batch_size=64"], capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = models.checkpoint_path(out_dir, "cl", 1, "lh", "FFA-1").parent
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "last.pt", "log.csv", "log.csv.meta.json"]
    ddp_row, single_row = read_log(run_dir)[0], read_log(single_dir)[0]
    assert ddp_row["train_loss"] == pytest.approx(single_row["train_loss"], rel=1e-5)  # loss at the initial weights
    assert ddp_row["val_loss"] == pytest.approx(single_row["val_loss"], rel=1e-3)      # after one Adam step
    a = models.load_checkpoint(run_dir / "last.pt")["model"]
    b = models.load_checkpoint(single_dir / "last.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 2 * settings.lr + 1e-6  # at most a flipped sign of one first Adam step per weight
