"""Time backbones: feature-extraction and CL-training images/s, peak memory, and the full-size search cost.

Each measurement runs in a fresh child process (its own peak RSS; no thread pools of the last one left spinning),
random init, synthetic uint8 images normalised as the backbone's weights expect, float32 unless bf16=True.
extract: one forward of the feature extractor over the backbone's default layers (what a layer search runs);
train: CL training steps (forward, contrastive loss, backward, Adam) of a per-subject model on n_voxels voxels.
Backbones and modes alternate over `repeats` rounds, so background load hits them alike; medians are reported.
The full-size columns are extrapolated from the measured per-image rates and the layers' measured widths (PCA and
ridge not included). `python benchmark.py --benchmarks=backbones` runs this with its defaults.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
names = ["alexnet", "resnet18", "resnet50", "vit_b_16", "convnext_tiny"]  # backbones (backbones.parse names)
modes = ["extract", "train"]     # extract: forward over the default layers | train: CL training steps
image_size = 224                 # px
batch_size = 32                  # images per forward (extract) and per training step (train)
batches = 3                      # timed forwards or steps per measurement (after warmup)
warmup = 1                       # untimed forwards or steps per measurement
repeats = 3                      # rounds of every (backbone, mode) in its own child process; medians reported
threads = 0                      # torch threads in each child (0: torch's default)
device = "cpu"                   # cpu or cuda
bf16 = False                     # bfloat16 autocast (float32 otherwise)
channels_last = True             # as features.extract_features and training run backbones
n_voxels = 500                   # train: voxels of the ROI (CL hidden size h = 0.8 V)
full_size_images = 9841          # a real subject's training images (subjects 1, 2, 5, 7), for the extrapolation
tuned_models = 842               # CL + reg models of the paper's sweep (421 subject/hemisphere/ROI with >= 20 voxels)
out_dir = "out/benchmark"        # backbones.md / backbones.json go here (with write_summary)
write_summary = True             # write backbones.md and backbones.json to out_dir
child = ""                       # internal: JSON of one measurement, run in a fresh process by the parent
# ---------------------------------------------------------------------
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_MARK = "@@RESULT@@"
TRAIN_FRACTION = 0.75            # utils.make_split: train rows of a subject's images


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure(name: str, mode: str = "extract", image_size: int = 224, batch_size: int = 32, batches: int = 3,
            warmup: int = 1, threads: int = 0, device: str = "cpu", bf16: bool = False, channels_last: bool = True,
            n_voxels: int = 500, seed: int = 0) -> dict:
    """Images/s of the feature extractor of `name`'s default layers, or of CL training steps (random init), in this
    process, and its peak memory."""
    import torch

    import contextlib

    import backbones
    import features
    import models
    import runtime
    if threads:
        torch.set_num_threads(int(threads))
    dev = runtime.resolve_device(device)
    torch.manual_seed(seed)
    models.check_image_size(name, "none", image_size)
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch_size, 3, image_size, image_size),
                                                                     dtype=np.uint8))
    widths = {}
    if mode == "extract":
        net = models.roi_backbone(name, "none").to(dev).eval()
        layers = backbones.default_layers(net)
        model = contextlib.ExitStack().enter_context(features.feature_extractor(net, layers)).eval()  # one per process
    else:
        net = model = models.build_model("cl", n_voxels, "none", backbone=name).to(dev).train()
        layers = ()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-6, **({"fused": True} if dev.type in ("cuda", "cpu")
                                                                       else {}))
        fmri = torch.randn(batch_size, n_voxels, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean, std = models.normalisation(net)
    built_rss = peak_rss_gb()

    def step():
        x = runtime.prepare_images(images, dev, channels_last, None, mean, std)
        with runtime.autocast_context(dev, bf16, cpu_bf16=bf16):
            if mode == "extract":
                feats = model(x)
                widths.update({layer: feats[layer][0].numel() for layer in layers})
                return [feats[layer].flatten(1).float().cpu() for layer in layers]
            loss, _ = models.batch_loss("cl", model, x, fmri, temperature=0.3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.inference_mode() if mode == "extract" else torch.enable_grad():
        for k in range(warmup + batches):
            if k == warmup:
                sync()
                t0, cpu0 = time.perf_counter(), _cpu_seconds()
            step()
        sync()
        seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"backbone": name, "mode": mode, "images_per_s": batch_size * batches / seconds,
            "images_per_cpu_s": batch_size * batches / cpu_seconds,
            "s_per_batch": seconds / batches, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "layers": len(layers), "features": int(sum(widths.values())), "widest_layer": int(max(widths.values(),
                                                                                                 default=0)),
            "rss_built_gb": built_rss, "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads(),
            "precision": "bf16" if bf16 else "float32", "image_size": image_size, "batch_size": batch_size}


def benchmark_backbones(names=("alexnet", "resnet18", "resnet50", "vit_b_16", "convnext_tiny"),
                        modes=("extract", "train"), repeats: int = 3, **job) -> list[dict]:
    """measure() of each backbone and mode, each in a fresh `python benchmark_backbones.py --child=...` process,
    backbones and modes interleaved over the rounds; one row per measurement."""
    rows = []
    for round_ in range(repeats):
        for name in names:
            for mode in modes:
                spec = {**job, "name": name, "mode": mode}
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--child={json.dumps(spec)}"],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"measuring {name} {mode} failed:\n{proc.stderr[-3000:]}")
                row = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)][-1][len(_MARK):])
                rows.append({**row, "round": round_, "load_1min": _load()})
                print(f"round {round_ + 1}/{repeats} {name} {mode}: {row['images_per_s']:.1f} images/s, peak RSS "
                      f"{row['peak_rss_gb']:.2f} GB (load {rows[-1]['load_1min']:.1f})", flush=True)
    return rows


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system): what a busy machine's other jobs do not take."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> float:
    import os
    return os.getloadavg()[0]


def summary(rows: list[dict], full_size_images: int = 9841, tuned_models: int = 842) -> list[dict]:
    """Per backbone: median images/s and peak memory of each mode, and the full-size costs extrapolated from them."""
    table = []
    n_train = int(TRAIN_FRACTION * full_size_images)
    for name in dict.fromkeys(r["backbone"] for r in rows):
        of = {mode: [r for r in rows if r["backbone"] == name and r["mode"] == mode] for mode in ("extract", "train")}
        out = {"backbone": name}
        if of["extract"]:
            rate = float(np.median([r["images_per_s"] for r in of["extract"]]))
            first = of["extract"][0]
            forward_s = full_size_images / rate
            out.update({"extract_images_per_s": rate, "extract_images_per_cpu_s": float(np.median(
                [r["images_per_cpu_s"] for r in of["extract"]])), "extract_peak_rss_gb": max(r["peak_rss_gb"] for r in
                                                                                 of["extract"]),
                        "params_m": first["params_m"], "layers": first["layers"],
                        "features_per_image": first["features"], "widest_layer": first["widest_layer"],
                        "search_forward_min": forward_s / 60,
                        "raw_activations_gb": first["features"] * full_size_images * 4 / 1e9,
                        "widest_train_features_gb": first["widest_layer"] * n_train * 4 / 1e9,
                        "tuned_search_forward_days": tuned_models * forward_s / 86400})
        if of["train"]:
            rate = float(np.median([r["images_per_s"] for r in of["train"]]))
            out.update({"train_images_per_s": rate, "train_images_per_cpu_s": float(np.median(
                [r["images_per_cpu_s"] for r in of["train"]])), "train_peak_rss_gb": max(r["peak_rss_gb"] for r in of["train"]),
                        "cl_epoch_min": n_train / rate / 60})
        out["load_1min_median"] = float(np.median([r["load_1min"] for r in of["extract"] + of["train"]]))
        table.append(out)
    return table


COLUMNS = ["backbone", "params_m", "extract_images_per_s", "extract_images_per_cpu_s", "extract_peak_rss_gb",
           "train_images_per_s", "train_images_per_cpu_s", "train_peak_rss_gb", "layers", "features_per_image", "widest_layer", "search_forward_min",
           "raw_activations_gb", "widest_train_features_gb", "cl_epoch_min", "tuned_search_forward_days",
           "load_1min_median"]


if __name__ == "__main__":
    import options
    config = options.apply_options(globals())
    if child:
        print(_MARK + json.dumps(measure(**json.loads(child))))
        sys.exit(0)
    import outputs
    import platform
    results = benchmark_backbones(names, modes, repeats, image_size=image_size, batch_size=batch_size,
                                  batches=batches, warmup=warmup, threads=threads, device=device, bf16=bf16,
                                  channels_last=channels_last, n_voxels=n_voxels)
    table = summary(results, full_size_images, tuned_models)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    text = (f"# Backbones: images/s, peak memory, full-size search cost\n\n{device} ({cpu}, "
            f"{results[0]['threads']} threads), {image_size} px, batch {batch_size}, {batches} timed batches after "
            f"{warmup} warmup, {results[0]['precision']}, random init; medians of {repeats} rounds (1-min load "
            f"average {min(r['load_1min'] for r in results):.1f}-{max(r['load_1min'] for r in results):.1f}; "
            f"images_per_cpu_s: per second of the process's CPU time, all threads). extract: the "
            f"default layers' feature extractor; train: CL steps on {n_voxels} voxels. Extrapolated from the "
            f"measured per-image rates and widths (PCA and ridge not included): search_forward_min, one forward "
            f"over {full_size_images} images; raw_activations_gb, its temporary activations on disk; "
            f"widest_train_features_gb, the widest layer's {int(TRAIN_FRACTION * full_size_images)} train rows "
            f"held for its PCA; cl_epoch_min, the train rows of one CL epoch; tuned_search_forward_days, "
            f"the forwards of {tuned_models} tuned models' searches.\n\n"
            + outputs.markdown_table(table, COLUMNS, float_format="{:.3g}"))
    print(text)
    if write_summary:
        outputs.save_text(Path(out_dir) / "backbones.md", text, config)
        outputs.save_json(Path(out_dir) / "backbones.json", {"rows": results, "summary": table}, config)
        print(f"wrote {Path(out_dir) / 'backbones.md'} and backbones.json")
