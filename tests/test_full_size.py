"""benchmark_full_size.py: the paper-sweep model count against the original masks, the projection, the readers of
the out_dir layout, the profile parts and the breadth report."""
from __future__ import annotations

import json

import numpy as np
import pytest

import benchmark_full_size as full_size
import options
import paths
import training_data
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


def test_stage_readers_follow_the_out_dir_layout(tmp_path):
    """Epoch times from each model's log.csv and each tuned search's seconds from its search file, where paths.py
    puts them for the harness's subject, hemisphere and ROI."""
    for method, epochs, seconds in (("cl", [3.0, 5.0], 12.5), ("reg", [2.0], 7.25)):
        run_dir = paths.model_dir(tmp_path, method, "lh", "early", subject=1)
        run_dir.mkdir(parents=True)
        paths.log_file(run_dir).write_text("epoch,epoch_s\n" + "".join(f"{i},{s}\n" for i, s in enumerate(epochs)))
        search_file = paths.search_file(tmp_path, 1, "lh", run_dir=run_dir)
        search_file.parent.mkdir(parents=True, exist_ok=True)
        search_file.write_text(json.dumps({"search_seconds": seconds}))
    assert full_size.mean_epoch_seconds(tmp_path, "cl", 1, "lh", "early") == 4.0
    assert full_size.mean_epoch_seconds(tmp_path, "reg", 1, "lh", "early") == 2.0
    assert full_size.search_seconds(tmp_path, 1, "lh", "early") == {"cl": 12.5, "reg": 7.25}
    assert full_size.search_seconds(tmp_path, 1, "lh", "FFA-1") == {}   # no models there: nothing searched


def _nested_work(n: int) -> int:
    return sum(_inner_work(i) for i in range(n))


def _inner_work(i: int) -> int:
    return sum(range(i))


def test_profile_parts_take_each_parts_largest_cumulative_time(tmp_path, monkeypatch):
    """A part listing a function and one it calls counts the caller's time once (not the sum of both)."""
    import cProfile
    import pstats
    stats_file = tmp_path / "run.prof"
    cProfile.runctx("_nested_work(300)", globals(), {}, str(stats_file))
    monkeypatch.setattr(full_size, "PROFILE_PARTS", {"outer": [("test_full_size.py", "_nested_work"),
                                                               ("test_full_size.py", "_inner_work")],
                                                     "inner": [("test_full_size.py", "_inner_work")],
                                                     "absent": [("nowhere.py", "f")]})
    parts = full_size.profile_parts(stats_file)
    cumulative = {func: entry[3] for (file, _, func), entry in pstats.Stats(str(stats_file)).stats.items()
                  if file.endswith("test_full_size.py")}
    assert parts["outer"] == round(cumulative["_nested_work"], 1) and parts["inner"] == round(
        cumulative["_inner_work"], 1)
    assert parts["absent"] == 0.0 and parts["outer"] <= parts["total"]


def test_breadth_copies_every_figure_and_reports_stages(tmp_path, monkeypatch):
    from PIL import Image
    results, searches = tmp_path / "Results", tmp_path / "searches"
    for folder, name, size in ((results / "subj01", "bars.png", (3200, 900)), (results, "retrieval.png", (800, 600)),
                               (searches / "alexnet" / "untuned" / "subj01", "lh.png", (1600, 500)),
                               (results / "subj02" / "maps", "accuracy_cl.png", (900, 400))):
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(folder / name)
    figures = full_size._copy_figures([results, searches], tmp_path / "samples")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted(
        f["figure"] for f in figures if f["copied"]) == [
        "Results_retrieval.png", "Results_subj01_bars.png", "searches_alexnet_untuned_subj01_lh.png"]
    assert [f["figure"] for f in figures if not f["copied"]] == ["Results_subj02_maps_accuracy_cl.png"]
    assert {f["figure"]: f["width_px"] for f in figures}["Results_subj01_bars.png"] == 3200
    monkeypatch.setattr(full_size, "breadth_subjects", [1, 2])
    rows = [{"stage": "data", "processes": 1, "seconds": 10.0, "cpu_s": 8.0, "peak_rss_gb": 0.5},
            {"stage": "cl sweeps, per subject", "processes": 2, "seconds": 100.4, "cpu_s": 150.0, "peak_rss_gb": 2.31}]
    report = full_size._breadth_report(rows, figures, 6.25)
    assert "| cl sweeps, per subject | 2 | 100 | 150 | 2.3 |" in report
    assert "| **total** | 3 | 110 | 158 | 2.3 |" in report
    assert "4 figures; widest: Results_subj01_bars.png 3200 x 900 px" in report and "1 wider than 3,000 px" in report
    assert "3 copied here" in report
    assert "Disk used by the run (data, caches, models, results): 6.2 GB." in report
