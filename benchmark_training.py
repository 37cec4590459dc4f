"""Time training on this machine's device: CL and reg training images/s per variant, the batch loader, the ridge on
GPU vs CPU, and the full paper sweep projected from the measured rates.

`python benchmark.py --benchmarks=gpu` runs this on one GPU with the real settings (224 px, batch 1024); on a CPU,
`python benchmark_training.py --device=cpu --batch_size=64` measures the same variants at a CPU-sized batch.
Variants (`variants`): precision fp32 | bf16 (autocast), -cl: channels_last, -resident: the subject's whole uint8
image cache (9,841 x 3 x 224 x 224, ~1.5 GB) held on the device so batches never cross PCIe (else each batch is
gathered in pinned host memory and copied), -compile: torch.compile. Each step is a full training step (batch
gather, uint8 -> normalised float, forward, loss, backward, Adam). Writes training_benchmark.md/.json to out_dir.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
out_dir = "out/benchmark"        # training_benchmark.md / .json (and loader_benchmark.*) go here
device = "auto"                  # auto (cuda if present), cpu, cuda
benchmarks = ["training", "ridge"]  # training (images/s per variant) | ridge (GPU vs CPU) | loader (batch delivery)
methods = ["cl", "reg"]          # ROI models timed
variants = ["fp32", "fp32-cl", "bf16", "bf16-cl", "bf16-cl-resident", "bf16-cl-resident-compile"]
image_size = 224                 # px (the real setting)
batch_size = 1024                # images per training step (the paper's; use 64 on a CPU)
n_voxels = 1000                  # ROI size of the timed models
n_images = 9841                  # images in the (synthetic) subject cache: a real subject's
steps = 10                       # timed steps per variant (after warmup)
warmup = 3                       # untimed steps per variant (compilation happens here)
ridge_train = 8000               # ridge: train images, features, voxels (as benchmark.py)
ridge_features = 1000
ridge_voxels = 20000
loader_images = 2000             # loader: synthetic uint8 image cache (memmap in a temp dir) of this many images
loader_batch_size = 256          # loader: batch
loader_rounds = 5                # loader: epochs per variant, variants interleaved
seed = 0
# ---------------------------------------------------------------------
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import benchmark_full_size
import encoding
import models
import options
import outputs
import runtime
import synthetic_data
import training_data

config = options.apply_options(globals())
dev = runtime.resolve_device(device)
unknown = set(benchmarks) - {"training", "ridge", "loader"} or {v for v in variants if v.split("-")[0] not in
                                                               ("fp32", "bf16")}
if unknown:
    raise options.OptionsError(f"unknown benchmarks or variants {sorted(unknown)}")
cuda = dev.type == "cuda"
machine = torch.cuda.get_device_name(dev) if cuda else f"CPU ({torch.get_num_threads()} threads, native bf16: " \
                                                       f"{runtime.cpu_has_native_bf16()})"
print(f"device: {machine}")
report = {"options": config, "device": machine}
text = f"# Training benchmark on {machine}\n\n"


def sync():
    if cuda:
        torch.cuda.synchronize(dev)


def training_rate(method: str, variant: str, host_images: torch.Tensor) -> float:
    """Images/s of full training steps of one ROI model in one variant, on random batches of the cache."""
    bf16, channels_last, resident, compiled = (variant.startswith("bf16"), "-cl" in variant,
                                               "-resident" in variant, "-compile" in variant)
    torch.manual_seed(seed)
    model = models.build_model(method, n_voxels, "none").to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6, fused=True)
    images = host_images.to(dev) if resident else host_images
    fmri = torch.randn(len(host_images), n_voxels, device=dev)
    rng = np.random.default_rng(seed)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast(dev.type, enabled=False))

    def step():
        rows = np.sort(rng.choice(len(host_images), batch_size, replace=False))
        if resident:
            batch = images[torch.as_tensor(rows, device=dev)]
        else:  # gathered from host memory (as from the memmapped cache), pinned for the copy
            batch = runtime.read_rows(images.numpy(), rows, pin=cuda)
        x = runtime.prepare_images(batch, dev, channels_last)
        with autocast:
            loss, _ = models.batch_loss(method, step_model, x, fmri[torch.as_tensor(rows, device=dev)],
                                        temperature=0.3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch_size * steps / (time.perf_counter() - t0)


def inference_rate(host_images: torch.Tensor) -> float:
    """Images/s of the backbone's forward pass (val and feature extraction), bf16 + channels_last where timed."""
    torch.manual_seed(seed)
    backbone = models.roi_backbone("alexnet", "none").to(dev).eval().to(memory_format=torch.channels_last)
    rows = np.arange(min(batch_size, len(host_images)))
    with torch.inference_mode(), runtime.autocast_context(dev, amp=True, cpu_bf16=True):
        for k in range(warmup + steps):
            if k == warmup:
                sync()
                t0 = time.perf_counter()
            backbone(runtime.prepare_images(host_images[rows], dev, channels_last=True))
    sync()
    return len(rows) * steps / (time.perf_counter() - t0)


if "training" in benchmarks:
    host_images = torch.randint(0, 256, (n_images, 3, image_size, image_size), dtype=torch.uint8)
    if cuda:
        host_images = host_images.pin_memory()
    rows = []
    for m in methods:
        for v in variants:
            rows.append({"method": m, "variant": v, "train_images_per_s": training_rate(m, v, host_images)})
            if cuda:
                torch.cuda.empty_cache()  # the last variant's model and resident cache are gone
    infer = inference_rate(host_images)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["train_images_per_s"]) for m in methods}
    epochs = {m: options.script_defaults(Path(__file__).resolve().parent / f"{m}_model_training.py")["epochs"]
              for m in ("cl", "reg")}  # the paper's, from the training scripts' OPTIONS
    jobs = benchmark_full_size.real_sweep_jobs(benchmark_full_size.MIN_VOXELS)
    total_s, projection = 0.0, []
    for m in methods:
        for subject, (n_subject, n_models) in jobs.items():
            n_train, n_val = int(0.75 * n_subject), int(0.10 * n_subject)
            per_model = epochs[m] * (n_train / best[m]["train_images_per_s"] + n_val / infer)
            total_s += per_model * n_models
            projection.append({"method": m, "subject": subject, "models": n_models, "minutes_per_model":
                               per_model / 60})
    one_cl = epochs["cl"] * (int(0.75 * 9841) / best["cl"]["train_images_per_s"] + int(0.1 * 9841) / infer) \
        if "cl" in best else float("nan")
    report.update(training=rows, inference_images_per_s=infer, projection=projection, sweep_hours=total_s / 3600,
                  one_cl_model_30_epochs_s=one_cl)
    text += (f"## Training images/s ({image_size} px, batch {batch_size}, {n_voxels}-voxel ROI)\n\n"
             + outputs.markdown_table(rows, float_format="{:.0f}")
             + f"\nbackbone inference (bf16 + channels_last): {infer:.0f} images/s\n\n"
             f"Projected from the best variant of each method (an extrapolation, not a run): one CL model of a "
             f"9,841-image subject for 30 epochs (train + val passes): {one_cl:.0f} s; the full paper sweep (8 "
             f"subjects x 2 hemispheres x every ROI with >= 20 voxels: "
             f"{sum(n for _, n in jobs.values())} ROI models per method; CL 30 epochs, reg 75): "
             f"{total_s / 3600:.1f} device-hours (without feature extraction and results).\n\n")

if "ridge" in benchmarks:
    data = synthetic_data.make_synthetic_encoding_data(ridge_train, 1000, 0, ridge_features, ridge_voxels, seed=seed)
    ridge_rows = []
    for where in (["cuda", "cpu"] if cuda else ["cpu"]):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], device=where)
            sync()
            times.append(time.perf_counter() - t0)
        ridge_rows.append({"device": where, "best_s": min(times), "median_s": float(np.median(times))})
    report["ridge"] = ridge_rows
    text += (f"## Per-voxel-alpha ridge ({ridge_train} train / 1000 val x {ridge_features} features -> "
             f"{ridge_voxels} voxels, {len(encoding.ALPHAS)} alphas), 3 fits\n\n"
             + outputs.markdown_table(ridge_rows, float_format="{:.2f}") + "\n")

if "loader" in benchmarks:
    def epoch_seconds(loader, epoch: int, read_ahead: bool) -> float:
        loader.batch_sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in (training_data.read_batches(loader) if read_ahead else loader):
            runtime.prepare_images(batch["images"], dev, channels_last=True)
        sync()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        shape = (loader_images, 3, image_size, image_size)
        cache = np.lib.format.open_memmap(Path(tmp) / "cache.npy", mode="w+", dtype=np.uint8, shape=shape)
        for start in range(0, loader_images, 256):  # written in chunks: flat memory
            cache[start:start + 256] = np.random.default_rng(start).integers(0, 256, cache[start:start + 256].shape,
                                                                             dtype=np.uint8)
        cache.flush()
        del cache
        dataset = training_data.ImageRows([np.load(Path(tmp) / "cache.npy", mmap_mode="r")])
        variants_of_loader = {}
        for workers in (0, 1, 2):
            sampler = training_data.GlobalBatchSampler(dataset, [np.arange(loader_images)], loader_batch_size, seed)
            loader = training_data.make_loader(dataset, sampler, dev, workers)
            variants_of_loader[f"DataLoader, {workers} workers"] = (loader, False)
            if workers == 0:
                variants_of_loader["DataLoader, 0 workers + read-ahead thread (training's)"] = (loader, True)
        times = {name: [] for name in variants_of_loader}
        for epoch in range(loader_rounds + 1):  # epoch 0: warm-up (page cache, worker start-up)
            for name, (loader, read_ahead) in variants_of_loader.items():
                seconds = epoch_seconds(loader, epoch, read_ahead)
                if epoch:
                    times[name].append(seconds)
        del variants_of_loader, loader, dataset
    loader_rows = [{"variant": name, "epoch_s_best": min(t), "epoch_s_median": float(np.median(t)),
                    "images_per_s": loader_images / min(t)} for name, t in times.items()]
    report["loader"] = loader_rows
    text += (f"## Batch delivery: one epoch of {loader_images} images ({image_size} px uint8 memmap), batch "
             f"{loader_batch_size}, normalised on {dev}\n\n" + outputs.markdown_table(loader_rows, float_format="{:.3g}")
             + "\n")

print(text)
outputs.save_text(Path(out_dir) / "training_benchmark.md", text, config)
outputs.save_text(Path(out_dir) / "training_benchmark.json", json.dumps(outputs.plain(report), indent=1), config)
print(f"wrote {Path(out_dir) / 'training_benchmark.md'}")
