"""Run one real-sized synthetic subject through every stage; record wall time and peak RSS per stage and size.

For each size in `sizes` (training images), make_demo_data.py writes one subject with the real vertex counts
(its bundled real masks), 425-px PNGs and `n_test_images` test images; then every stage runs as its own process
with the real settings except epochs: voxel-ROI mappings; one CL and one reg model on the largest non-empty ROI
for `epochs` epoch(s); the layer search stage (get_best_alex_layer.py: the untuned network over every ROI of both
hemispheres, then each tuned backbone over its ROI; 8 AlexNet layers at 224 px, PCA(1000)); single-subject results
for that ROI; test-image predictions for every vertex of both hemispheres. Peak RSS is the stage process's own (os.wait4), children included.
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
stages = ["data", "mappings", "cl", "reg", "search_untuned", "search_tuned", "results", "predict"]  # in order
keep_data = False                # keep each size's dataset and outputs (about 1.2 GB of PNGs at 9,841 images)
profile = False                  # run the search stages under cProfile: seconds per part (forward pass, PCA, ridge, disk)
report_only = False              # only rewrite full_size.md from the rows in out_dir/full_size.json
breadth = False                  # instead: the breadth check (every stage, every ROI of both hemispheres of 8
                                 # subjects at tiny settings) in out_dir/breadth; figures to breadth_samples_dir
breadth_subjects = [1, 2, 3, 4, 5, 6, 7, 8]  # synthetic subjects with their real masks
breadth_images = 200             # training images per subject (train 150 / val 20 / test 30)
breadth_px = 64                  # PNG side and network input in pixels
breadth_tuned_rois = ["V1v", "FFA-1"]  # ROIs given CL, reg and pooled CL models (each hemisphere and subject;
                                 # pooled: + one without each subject); the untuned set covers all ROIs
breadth_keep = False             # keep the breadth run's data and out_dir (about 6 GB per tuned ROI; else deleted)
breadth_samples_dir = "Results/samples/breadth"  # the run's figures and breadth.md are copied here
# ---------------------------------------------------------------------
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import mask_bundle
import options
import outputs
import study
import paths
import training_data
import utils

REPO = Path(__file__).resolve().parent
SWEEP_EPOCHS = {m: options.script_defaults(REPO / f"{m}_model_training.py")["epochs"] for m in ("cl", "reg")}
MIN_VOXELS = options.script_defaults(REPO / "cl_model_training.py")["min_voxels"]  # the sweeps' ROI size threshold


# cProfile parts of a search stage: label -> (file name, function) pairs; a part's time is the largest cumulative
# time among them (alternatives, or a function and one it calls)
PROFILE_PARTS = {
    "load subject (fMRI, image cache)": [("utils.py", "load_subject")],
    "forward pass (raw activations to disk)": [("features.py", "extract_features")],
    "PCA fit (+ train scores)": [("pca.py", "fit"), ("pca.py", "fit_transform")],
    "PCA transform (val, test)": [("pca.py", "transform"), ("_base.py", "transform")],
    "feature cache writes": [("outputs.py", "atomic_write")],
    "feature cache reads": [("features.py", "_load_cached")],
    "ridge (scaling, fits, scores)": [("search.py", "layer_roi_scores")],
}


def run_stage(log_dir: Path, name: str, script: str, *args, profile_to: Path | None = None) -> dict:
    """One stage in a fresh process: wall seconds, CPU seconds and that process's peak RSS (GB); a failed stage
    raises. profile_to: run it under cProfile, stats written there."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    profiler = ["-m", "cProfile", "-o", str(profile_to)] if profile_to else []
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *profiler, str(REPO / script), *args], stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{script} exited with {code}; its output: {log_path}\n" + log_path.read_text()[-1500:])
    return {"seconds": round(seconds, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 2)}


def profile_parts(stats_file: Path) -> dict:
    """Seconds of each PROFILE_PARTS part (cumulative, all calls) and the whole run, from cProfile stats."""
    import pstats
    stats = pstats.Stats(str(stats_file)).stats  # (file, line, function) -> (calls, prim calls, own, cumulative, _)
    parts = {label: round(max([entry[3] for (file, _, func), entry in stats.items()
                               if (Path(file).name, func) in set(wanted)], default=0.0), 1)
             for label, wanted in PROFILE_PARTS.items()}
    parts["total"] = round(max(entry[3] for entry in stats.values()), 1)
    return parts


def largest_roi(data_dir, subject: int, hemi: str) -> tuple[str, int]:
    rois = utils.roi_voxel_indices(utils.find_subject(data_dir, subject), hemi)
    name = max(rois, key=lambda r: len(rois[r]))
    return name, len(rois[name])


def mean_epoch_seconds(out: Path, method: str, subject: int, hemi: str, roi: str) -> float:
    """Mean of the training log's epoch_s (train + val + checkpoint; excludes start-up and the image cache)."""
    log = paths.log_file(paths.model_dir(out, method, hemi, roi, subject=subject))
    with open(log, newline="") as f:
        return float(np.mean([float(r["epoch_s"]) for r in csv.DictReader(f)]))


def search_seconds(out: Path, subject: int, hemi: str, roi: str) -> dict:
    """Seconds of each tuned backbone's 8-layer search, as the search stage recorded them in each search file."""
    files = {m: paths.search_file(out, subject, hemi, run_dir=paths.model_dir(out, m, hemi, roi, subject=subject))
             for m in ("cl", "reg")}
    return {m: json.loads(path.read_text())["search_seconds"] for m, path in files.items() if path.is_file()}


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
    if breadth:
        print(breadth_check(config))
        return
    out = Path(out_dir)
    previous = out / "full_size.json"  # (size, stage) rows of an earlier run are kept unless measured again
    rows = [r for r in json.loads(previous.read_text())["rows"]
            if report_only or r["n_train_images"] not in sizes or r["stage"] not in stages] \
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
            elif stage in ("cl", "reg"):
                if not chosen_roi:
                    chosen_roi, n_vox = largest_roi(data, subject, hemisphere)
                    print(f"  largest non-empty ROI: {chosen_roi} ({n_vox} vertices)", flush=True)
                result = run_stage(logs, stage, f"{stage}_model_training.py", *common, subj,
                                   f"--hemisphere={hemisphere}", f"--roi={chosen_roi}", f"--epochs={epochs}",
                                   f"--batch_size={batch_size}")
                result["epoch_s"] = round(mean_epoch_seconds(pipe, stage, subject, hemisphere, chosen_roi), 1)
                result["roi"] = chosen_roi
            elif stage in ("search_untuned", "search_tuned"):
                chosen_roi = chosen_roi or largest_roi(data, subject, hemisphere)[0]
                which = ["--feature_sets=untuned"] if stage == "search_untuned" else \
                    ["--feature_sets=cl,reg", f"--hemispheres={hemisphere}", f"--rois={chosen_roi}"]
                stats_file = logs / f"{stage}.prof" if profile else None
                result = run_stage(logs, stage, "get_best_alex_layer.py", *common, subj, *which,
                                   f"--pca_components={pca_components}", profile_to=stats_file)
                if stage == "search_tuned":
                    result["search_s_per_backbone"] = search_seconds(pipe, subject, hemisphere, chosen_roi)
                if profile:
                    result["profile_s"] = profile_parts(stats_file)
            elif stage == "results":
                chosen_roi = chosen_roi or largest_roi(data, subject, hemisphere)[0]
                result = run_stage(logs, stage, "generate_results.py", *common, subj,
                                   f"--results_dir={pipe / 'Results'}", "--result_type=single-subj",
                                   f"--hemispheres={hemisphere}", f"--rois={chosen_roi}",
                                   "--feature_sets=untuned,reg,cl",
                                   "--comparisons=cl:untuned,cl:reg", f"--pca_components={pca_components}")
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


def breadth_check(config: dict) -> str:
    """Every stage over every ROI of both hemispheres of several subjects at tiny settings, each stage as its own
    processes: seconds (summed) and peak RSS (the largest process); the figures are copied to breadth_samples_dir."""
    out = Path(out_dir) / "breadth"
    data, pipe, results, logs = out / "data", out / "out", out / "Results", out / "logs"
    shutil.rmtree(out, ignore_errors=True)  # every stage measured from scratch
    subjects_arg = "--subjects=" + ",".join(str(s) for s in breadth_subjects)
    tuned_rois = ",".join(breadth_tuned_rois)
    rois_arg = f"--rois={tuned_rois}"
    common = [f"--data_dir={data}", f"--out_dir={pipe}", "--weights=none", f"--image_size={breadth_px}"]
    train = [*common, "--hemispheres=lh,rh", rois_arg, "--epochs=1", "--batch_size=64", "--seeds=0",
             "--checkpoint_dtype=bfloat16"]   # bfloat16: half the disk (AlexNet: 122 MB a model)
    pooled = "--pooled_h_method=average"      # pooled CL heads of the subjects' mean size (as make demo)
    sets_args = ["--feature_sets=untuned,reg,cl,pooled-cl",
                 "--comparisons=cl:untuned,cl:reg,pooled-cl:untuned,pooled-cl:cl"]
    stages = [
        ("data", [("make_demo_data.py", f"--out_dir={data}", subjects_arg, f"--n_train_images={breadth_images}",
                   "--n_test_images=20", f"--image_px={breadth_px}", "--imagefolder_per_class=10",
                   "--overwrite=true")]),
        ("mappings", [("generate_voxel_roi_mappings.py", f"--data_dir={data}", f"--out_dir={pipe}", subjects_arg)]),
        ("cl sweeps, per subject", [("cl_model_training_all_rois.py", *train, f"--subjects={s}")
                                    for s in breadth_subjects]),
        ("reg sweeps, per subject", [("reg_model_training_all_rois.py", *train, f"--subjects={s}")
                                     for s in breadth_subjects]),
        ("pooled-cl sweeps (all, and without each subject)",
         [("cl_model_training_all_rois.py", *train, pooled, subjects_arg, f"--exclude_subject={s}")
          for s in [0, *breadth_subjects]]),
        ("layer search: untuned", [("get_best_alex_layer.py", *common, subjects_arg, "--feature_sets=untuned")]),
        ("layer search: tuned", [("get_best_alex_layer.py", *common, pooled, subjects_arg,
                                  "--feature_sets=cl,reg,pooled-cl", rois_arg)]),
        ("results (all result types)", [("generate_results.py", *common, pooled, subjects_arg,
                                         f"--results_dir={results}",
                                         "--result_type=all", *sets_args, f"--cross_subj_rois={tuned_rois}",
                                         f"--classification_rois={tuned_rois}",
                                         f"--classification_root={data / 'imagefolder'}")]),
        ("test-image predictions", [("predict_test_images.py", *common, pooled, subjects_arg,
                                     "--tuned_sets=cl,reg,pooled-cl", f"--submission_dir={results / 'submission'}")]),
    ]
    rows = []
    for name, commands in stages:
        print(f"[breadth] {name} ({len(commands)} process(es)) ...", flush=True)
        slug = re.sub(r"\W+", "_", name).strip("_")
        runs = [run_stage(logs, f"{slug}-{k}", script, *args)
                for k, (script, *args) in enumerate(commands)]
        rows.append({"stage": name, "processes": len(runs), "seconds": round(sum(r["seconds"] for r in runs), 1),
                     "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)})
        print(f"  {rows[-1]}", flush=True)
    figures = _copy_figures([results, pipe / "searches"], Path(breadth_samples_dir))
    disk_gb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1024 ** 3
    if not breadth_keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(pipe, ignore_errors=True)
    report = _breadth_report(rows, figures, disk_gb)
    outputs.save_json(out / "breadth.json", {"rows": rows, "figures": figures, "disk_gb": round(disk_gb, 2)}, config)
    for folder in (out, Path(breadth_samples_dir)):
        outputs.save_text(folder / "breadth.md", report, config)
    return report


def _copy_figures(sources, destination: Path, copy_subject: str = "subj01") -> list[dict]:
    """The size of every PNG under the source folders (-> one dict each, 'copied' or not); copied to destination
    (relative paths joined by '_'): all but the per-subject figures of subjects other than copy_subject, which
    repeat the first subject's design (130 figures, 25 MB, at 8 subjects)."""
    from PIL import Image
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True, exist_ok=True)
    found = []
    for source in sources:
        for png in sorted(Path(source).rglob("*.png")):
            parts = png.relative_to(source).parts
            other_subject = any(re.fullmatch(r"subj\d+", part) and part != copy_subject for part in parts[:-1])
            target = destination / "_".join((source.name,) + parts)
            if not other_subject:
                shutil.copyfile(png, target)
            with Image.open(png) as image:
                found.append({"figure": target.name, "width_px": image.width, "height_px": image.height,
                              "copied": not other_subject})
    return found


def _breadth_report(rows, figures, disk_gb: float) -> str:
    total = {"stage": "**total**", "processes": sum(r["processes"] for r in rows),
             "seconds": round(sum(r["seconds"] for r in rows), 1), "cpu_s": round(sum(r["cpu_s"] for r in rows), 1),
             "peak_rss_gb": max(r["peak_rss_gb"] for r in rows)}
    lines = [f"Breadth check: subjects {', '.join(map(str, breadth_subjects))}, both hemispheres, every ROI "
             f"(tuned models: {', '.join(breadth_tuned_rois)}), {breadth_images} training images at {breadth_px} px, "
             "1 epoch, weights none, 1 seed.", "",
             "| stage | processes | seconds | CPU s | peak RSS GB |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['processes']} | {r['seconds']:,.0f} | {r['cpu_s']:,.0f} | {r['peak_rss_gb']:.1f} |"
              for r in rows + [total]]
    wide = sorted(figures, key=lambda f: -f["width_px"])
    lines += ["", f"{len(figures)} figures; widest: " + ", ".join(f"{f['figure']} {f['width_px']} x {f['height_px']} px"
                                                             for f in wide[:5])
              + f"; {sum(f['width_px'] > 3000 for f in figures)} wider than 3,000 px; "
              f"{sum(f.get('copied', True) for f in figures)} copied here (the other subjects' own figures are left "
              "out: they repeat the first one's).",
              "", f"Disk used by the run (data, caches, models, results): {disk_gb:.1f} GB."]
    return "\n".join(lines) + "\n"


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
        lines += ["", "8-layer search of one tuned backbone (in search_tuned): " + "; ".join(searches) + "."]
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
