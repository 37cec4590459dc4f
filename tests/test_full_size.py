"""benchmark_full_size.py's arithmetic: the paper-sweep model count against the original masks, the projection."""
from __future__ import annotations

import numpy as np
import pytest

import benchmark_full_size as full_size
import options
import utils
from conftest import REPO

ORIGINAL_MASKS = REPO.parent / "shared" / "algonauts_roi_masks"


def test_sweep_counts_the_trainable_rois_of_the_original_masks():
    if not ORIGINAL_MASKS.is_dir():
        pytest.skip(f"{ORIGINAL_MASKS} not here (a fresh clone has no ../shared)")
    n_models = 0
    for s in range(1, 9):
        folder = ORIGINAL_MASKS / f"subj{s:02d}"
        for hemi in ("lh", "rh"):
            for family in utils.ROI_FAMILIES:
                labels = np.load(folder / f"{hemi}.{family}_challenge_space.npy")
                names = utils.load_roi_mapping(folder / f"mapping_{family}.npy")
                n_models += sum(1 for k, name in names.items() if k > 0 and name != "Unknown"
                                and np.count_nonzero(labels == k) >= options.script_defaults(REPO / "cl_model_training.py")["min_voxels"])
    assert full_size.sweep_models()["models"] == n_models


def test_sweep_projection_is_epochs_times_measured_epoch_time(monkeypatch):
    monkeypatch.setattr(full_size, "sweep_models", lambda: {"models": 10, "images_per_model_mean": 1500.0})
    rows = [{"n_train_images": 500, "stage": "cl", "seconds": 1, "peak_rss_gb": 1, "epoch_s": 99.0},
            {"n_train_images": 1000, "stage": "cl", "seconds": 12, "peak_rss_gb": 2.5, "epoch_s": 10.0},
            {"n_train_images": 1000, "stage": "reg", "seconds": 22, "peak_rss_gb": 2.0, "epoch_s": 20.0}]
    sweep = full_size._sweep(rows)  # the largest size's epochs, scaled by 1500 / 1000 images
    hours_per_model = (30 * 10.0 + 75 * 20.0) * 1.5 / 3600
    assert sweep["hours_per_model"] == pytest.approx(hours_per_model, abs=0.005)
    assert sweep["cpu_days"] == pytest.approx(hours_per_model * 10 / 24, abs=0.05)
    report = full_size._report(rows)
    assert "| cl | 1 / 1.0 | 12 / 2.5 |" in report and "| reg | - | 22 / 2.0 |" in report
