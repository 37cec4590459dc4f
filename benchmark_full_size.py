"""Run one real-sized synthetic subject through every stage; record wall time and peak RSS per stage and size.

For each size in `sizes` (training images), make_demo_data.py writes one subject with the real vertex counts
(its bundled real masks), 425-px PNGs and `n_test_images` test images; then every stage runs as its own process
with the real settings except epochs: voxel-ROI mappings; best untuned layer over the 8 AlexNet layers at 224 px
with PCA(1000); one CL and one reg model on the largest non-empty ROI for `epochs` epoch(s); single-subject
results for that ROI (tuned backbones searched over the 8 layers like the untuned one); test-image predictions
for every vertex of both hemispheres. Peak RSS is the stage process's own (os.wait4), children included.
Writes full_size.md / full_size.json to out_dir: one row per size x stage, and the full paper sweep projected
from the measured epoch times.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
out_dir = "out/full_size"        # datasets, pipeline outputs and the tables go here
subject = 1                      # whose real masks and vertex counts the synthetic subject gets
sizes = [1000, 2500, 5000, 9841]  # training images per run (9,841: subjects 1, 2, 5, 7)
n_test_images = 159              # challenge test images (159-395 in the real data)
image_px = 425                   # PNG side in pixels (the real data's)
image_size = 224                 # pixels fed to AlexNet (the real setting)
pca_components = 1000            # the real setting
epochs = 1                       # training epochs per model (the only setting below the paper's)
batch_size = 1024                # training batch (the paper's)
weights = "none"                 # random init: same time and memory as IMAGENET1K_V1, and runs offline
hemisphere = "lh"                # hemisphere of the two trained models and of the results stage
roi = ""                         # ROI of the trained models; "" = the largest non-empty one of the hemisphere
stages = ["data", "mappings", "best_layer", "cl", "reg", "results", "predict"]  # which to run, in this order
keep_data = False                # keep each size's dataset and outputs (about 1.2 GB of PNGs at 9,841 images)
report_only = False              # only rewrite full_size.md from the rows in out_dir/full_size.json
# ---------------------------------------------------------------------
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import mask_bundle
import models
import options
import outputs
import study
import utils

REPO = Path(__file__).resolve().parent
SWEEP_EPOCHS = {m: options.script_defaults(REPO / f"{m}_model_training.py")["epochs"] for m in ("cl", "reg")}
MIN_VOXELS = options.script_defaults(REPO / "cl_model_training.py")["min_voxels"]  # the sweeps' ROI size threshold


def run_stage(log_dir: Path, name: str, script: str, *args) -> dict:
    """One stage in a fresh process: wall seconds and that process tree's peak RSS (GB); a failed stage raises."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / script), *args], stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{script} exited with {code}; its output: {log_path}\n" + log_path.read_text()[-1500:])
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 2)}


def largest_roi(data_dir, subject: int, hemi: str) -> tuple[str, int]:
    rois = utils.roi_voxel_indices(utils.find_subject(data_dir, subject), hemi)
    name = max(rois, key=lambda r: len(rois[r]))
    return name, len(rois[name])


def mean_epoch_seconds(out: Path, method: str, subject: int, hemi: str, roi: str) -> float:
    """Mean of the training log's epoch_s (train + val + checkpoint; excludes start-up and the image cache)."""
    log = models.checkpoint_path(out, method, subject, hemi, roi).parent / "log.csv"
    with open(log, newline="") as f:
        return float(np.mean([float(r["epoch_s"]) for r in csv.DictReader(f)]))


def search_seconds(out: Path, subject: int, hemi: str, roi: str) -> dict:
    """Seconds of each tuned backbone's 8-layer search, as the results stage recorded them."""
    paths = {m: study.best_layer_path(out, subject, hemi, m) for m in ("cl", "reg")}
    return {m: json.loads(path.read_text())[roi]["search_seconds"] for m, path in paths.items() if path.is_file()}


REAL_TRAIN_IMAGES = {1: 9841, 2: 9841, 3: 9082, 4: 8779, 5: 9841, 6: 9082, 7: 9841, 8: 8779}  # per NSD subject


def real_sweep_jobs(min_voxels: int) -> dict:
    """Per real subject: (training images, ROI models over both hemispheres with >= min_voxels), from the bundle."""
    masks, mappings = mask_bundle.load_mask_bundle()
    jobs = {}
    for subject in sorted(masks):
        count = sum(1 for hemi in utils.HEMISPHERES for family, labels in masks[subject][hemi].items()
                    for roi_id, name in mappings[subject][family].items()
                    if roi_id and name != "Unknown" and np.count_nonzero(labels == roi_id) >= min_voxels)
        jobs[subject] = (REAL_TRAIN_IMAGES[subject], count)
    return jobs


def sweep_models() -> dict:
    """The paper sweep's per-subject ROI models (>= training's minimum voxels) in the 8 real subjects' masks."""
    jobs = real_sweep_jobs(MIN_VOXELS)
    n_models = sum(n for _, n in jobs.values())
    return {"models": n_models, "images_per_model_mean": sum(i * n for i, n in jobs.values()) / n_models}


def main():
    config = options.apply_options(globals())
    out = Path(out_dir)
    previous = out / "full_size.json"  # sizes measured by an earlier run are kept unless measured again
    rows = [r for r in json.loads(previous.read_text())["rows"] if report_only or r["n_train_images"] not in sizes] \
        if previous.is_file() else []
    for n_train in ([] if report_only else sizes):
        data, pipe = out / f"data_{n_train}", out / f"out_{n_train}"
        common = [f"--data_dir={data}", f"--out_dir={pipe}", f"--weights={weights}", f"--image_size={image_size}"]
        subj = f"--subjects={subject}"
        chosen_roi, logs = roi, out / "logs" / str(n_train)
        for stage in stages:
            print(f"[{n_train} images] {stage} ...", flush=True)
            if stage == "data":
                result = run_stage(logs, stage, "make_demo_data.py", f"--out_dir={data}", f"--subjects={subject}",
                                   f"--n_train_images={n_train}", f"--n_test_images={n_test_images}",
                                   f"--image_px={image_px}", "--imagefolder_per_class=0", "--overwrite=true")
            elif stage == "mappings":
                result = run_stage(logs, stage, "generate_voxel_roi_mappings.py", f"--data_dir={data}",
                                   f"--out_dir={pipe}", subj)
            elif stage == "best_layer":
                result = run_stage(logs, stage, "get_best_alex_layer.py", *common, subj,
                                   f"--pca_components={pca_components}")
            elif stage in ("cl", "reg"):
                if not chosen_roi:
                    chosen_roi, n_vox = largest_roi(data, subject, hemisphere)
                    print(f"  largest non-empty ROI: {chosen_roi} ({n_vox} vertices)", flush=True)
                result = run_stage(logs, stage, f"{stage}_model_training.py", *common, f"--subject={subject}",
                                   f"--hemisphere={hemisphere}", f"--roi={chosen_roi}", f"--epochs={epochs}",
                                   f"--batch_size={batch_size}")
                result["epoch_s"] = round(mean_epoch_seconds(pipe, stage, subject, hemisphere, chosen_roi), 1)
                result["roi"] = chosen_roi
            elif stage == "results":
                chosen_roi = chosen_roi or largest_roi(data, subject, hemisphere)[0]
                result = run_stage(logs, stage, "generate_results.py", *common, subj,
                                   f"--results_dir={pipe / 'Results'}", "--result_type=single-subj",
                                   f"--hemispheres={hemisphere}", f"--rois={chosen_roi}",
                                   "--feature_sets=untuned,reg,cl",
                                   "--comparisons=cl:untuned,cl:reg", f"--pca_components={pca_components}")
                result["search_s_per_backbone"] = search_seconds(pipe, subject, hemisphere, chosen_roi)
            elif stage == "predict":
                result = run_stage(logs, stage, "predict_test_images.py", *common, subj,
                                   f"--submission_dir={pipe / 'submission'}", "--tuned_sets=cl,reg",
                                   f"--pca_components={pca_components}")
            else:
                raise options.OptionsError(f"--stages: unknown stage {stage!r}; expected among {stages}")
            row = {"n_train_images": n_train, "stage": stage, **result}
            print(f"  {row}", flush=True)
            rows.append(row)
            outputs.save_json(out / "full_size.json", {"rows": rows}, config)
        if not keep_data:
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(pipe, ignore_errors=True)
    report = _report(rows)
    outputs.save_text(out / "full_size.md", report, config)
    outputs.save_json(out / "full_size.json", {"rows": rows, "sweep": _sweep(rows)}, config)
    print(report)


def _sweep(rows) -> dict:
    """The paper's per-subject sweep (the scripts' default epochs per trainable ROI model) on this CPU, from the
    largest measured size's epoch times scaled linearly with each subject's image count."""
    largest = max(r["n_train_images"] for r in rows)
    epoch = {r["stage"]: r["epoch_s"] for r in rows if r["n_train_images"] == largest and "epoch_s" in r}
    if set(epoch) != {"cl", "reg"}:
        return {}
    models = sweep_models()
    scale = models["images_per_model_mean"] / largest
    per_model_h = sum(SWEEP_EPOCHS[m] * epoch[m] * scale for m in epoch) / 3600
    return {"models": models["models"], "measured_at_images": largest, "epoch_s": epoch,
            "hours_per_model": round(per_model_h, 2), "cpu_days": round(per_model_h * models["models"] / 24, 1)}


def _report(rows) -> str:
    sizes_run = sorted({r["n_train_images"] for r in rows})
    stage_names = list(dict.fromkeys(r["stage"] for r in rows))
    cell = {(r["stage"], r["n_train_images"]): r for r in rows}
    head = "| stage | " + " | ".join(f"{n:,} images: s / GB" for n in sizes_run) + " |"
    lines = [head, "|" + "---|" * (len(sizes_run) + 1)]
    for stage in stage_names:
        cells = [f"{cell[stage, n]['seconds']:,.0f} / {cell[stage, n]['peak_rss_gb']:.1f}" if (stage, n) in cell
                 else "-" for n in sizes_run]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    searches = [f"{r['n_train_images']:,} images: " + ", ".join(f"{m} {t:.0f} s" for m, t in
                                                            r["search_s_per_backbone"].items())
                for r in sorted(rows, key=lambda r: r["n_train_images"]) if r.get("search_s_per_backbone")]
    if searches:
        lines += ["", "8-layer search of one tuned backbone (part of the results stage): " + "; ".join(searches) + "."]
    sweep = _sweep(rows)
    if sweep:
        lines += ["", f"Paper sweep projected on this CPU: {sweep['models']} per-subject ROI models (>= "
                      f"{MIN_VOXELS} voxels) x (CL {SWEEP_EPOCHS['cl']} + reg {SWEEP_EPOCHS['reg']} "
                      f"epochs) at the measured {sweep['epoch_s']} s/epoch ({sweep['measured_at_images']:,} images) "
                      f"= {sweep['hours_per_model']} h per model, {sweep['cpu_days']} CPU-days."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except (options.DataError, RuntimeError) as err:
        sys.exit(f"benchmark_full_size.py: {err}")
