"""Time the encoding core against sklearn on synthetic data with a planted low-rank linear signal.

(a) our per-voxel-alpha ridge vs one fixed-alpha sklearn Ridge fit (target: ours <= 2x sklearn);
(b) ours vs sklearn RidgeCV(alphas, alpha_per_target=True) (target: ours >= 10x faster);
(c) vectorised pearson_r vs a scipy.stats.pearsonr loop over voxels (target >= 100x);
(d) peak memory (RSS) of the process running our fit, data included (target < 6 GB);
(loader) one epoch of training batches from a 224 px uint8 image cache: the hand-written thread prefetch vs the
torch DataLoader of training_data.py (--benchmarks=loader; written to loader_benchmark.md/json).
Every fit runs in a fresh child process (its own peak RSS; no torch/OpenBLAS thread pools spinning
against each other) and the methods alternate over rounds, so background load hits them alike.
Both libraries get the same float32 arrays; the table says what dtype each computed in.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
out_dir = "out/benchmark"        # benchmark.md / benchmark.json go here (with write_summary)
n_train = 8000                   # train images
n_val = 1000                     # validation images (alpha selection)
n_test = 1500                    # images for the Pearson benchmark
n_features = 1000                # features (e.g. PCA components)
n_voxels = 20000                 # voxels
n_alphas = 7                     # alpha grid np.logspace(1, 7, n_alphas)
seed = 0                         # synthetic data seed
benchmarks = ["ridge", "ridgecv", "pearson", "memory"]  # which to run
rounds = 3                       # child processes per ridge method, interleaved
fits_per_child = 3               # timed fits in each child (the first includes library start-up)
write_summary = True             # write benchmark.md and benchmark.json to out_dir
loader_images = 2000             # loader: synthetic uint8 image cache (memmap in a temp dir) of this many images
loader_image_size = 224          # loader: px
loader_batch_size = 256          # loader: batch
loader_rounds = 5                # loader: epochs per variant, variants interleaved
loader_device = "cpu"            # loader: where batches are normalised ("cuda": pinned memory and copies too)
child = ""                       # internal: JSON of one timed fit, run in a fresh process by the parent
# ---------------------------------------------------------------------
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import encoding
import make_demo_data
import options
import outputs
import utils


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def time_ridge_fit(method: str, n_train: int, n_val: int, n_features: int, n_voxels: int, n_alphas: int,
                   seed: int = 0, repeats: int = 3) -> dict:
    """Make synthetic data, then time one ridge method: 'ours' (per-voxel alpha), 'sklearn_ridge' (one
    fixed alpha), or 'sklearn_ridgecv' (alpha_per_target, LOO on train). Returns times, peak memory, dtypes.

    Meant to run in a fresh process (run_in_child) so the peak memory is this fit's alone.
    """
    data = make_demo_data.make_synthetic_encoding_data(n_train, n_val, 0, n_features, n_voxels, seed=seed)
    alphas = np.logspace(1, 7, n_alphas)
    data_rss = peak_rss_gb()
    times, cpu_times, info = [], [], {}
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "ours":
            fit = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], alphas=alphas)
            info = {"dtype": "float32 (torch)", "alpha_summary": fit.alpha_summary()}
        elif method == "sklearn_ridge":
            from sklearn.linear_model import Ridge
            fit = Ridge(alpha=encoding.PAPER_ALPHA_UNTUNED).fit(data["X_train"], data["Y_train"])
            info = {"dtype": str(fit.coef_.dtype), "solver": fit.solver_}
        elif method == "sklearn_ridgecv":
            from sklearn.linear_model import RidgeCV
            fit = RidgeCV(alphas=alphas, alpha_per_target=True).fit(data["X_train"], data["Y_train"])
            info = {"dtype": str(fit.coef_.dtype)}
        else:
            raise ValueError(f"unknown method {method!r}")
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del fit
    return {"method": method, "times_s": times, "cpu_s": cpu_times, "median_s": float(np.median(times)),
            "data_rss_gb": data_rss, "peak_rss_gb": peak_rss_gb(), **info}



def run_in_child(**kwargs) -> dict:
    """time_ridge_fit(**kwargs) in a fresh `python benchmark.py --child=...` process (its own peak RSS)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--child={json.dumps(kwargs)}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child time_ridge_fit({kwargs}) failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
    return json.loads(line[len("@@RESULT@@"):])


config = options.apply_options(globals())
if child:
    print("@@RESULT@@" + json.dumps(time_ridge_fit(**json.loads(child))))
    sys.exit(0)
unknown = set(benchmarks) - {"ridge", "ridgecv", "pearson", "memory", "loader"}
if unknown:
    raise utils.OptionsError(f"--benchmarks: unknown {sorted(unknown)}; "
                             "choose from ridge, ridgecv, pearson, memory, loader")


# ---- loader: one epoch's batch delivery, hand-written prefetch thread vs torch DataLoader ----
if "loader" in benchmarks:
    import tempfile

    import torch

    import features
    import training_data

    device = options.resolve_device(loader_device)
    pin = device.type == "cuda"

    def handwritten_epoch(images, rows, epoch, consume):
        """The former training.epoch_batches + features.prefetched thread + read_rows."""
        order = np.random.default_rng([seed, epoch]).permutation(rows)
        batches = [np.sort(b) for b in training_data.near_equal_batches(order, loader_batch_size)]
        for batch, _ in features.prefetched(lambda r: features.read_rows(images, r, pin), batches):
            consume(batch)

    def dataloader_epoch(loader, epoch, consume):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            consume(batch["images"])

    def read_ahead_epoch(loader, epoch, consume):  # what training does with loader_workers=0
        loader.batch_sampler.set_epoch(epoch)
        for batch in training_data.read_batches(loader):
            consume(batch["images"])

    def time_epoch(run, loader_or_images, epoch, normalise):
        """(epoch seconds, seconds the consumer waited for batches); normalise: the loop's first step on each
        batch (uint8 -> normalised float on the device), else the batch is only received."""
        waited, t_last = [], [0.0]

        def consume(batch):
            waited.append(time.perf_counter() - t_last[0])
            if normalise:
                features.prepare_images(batch, device, channels_last=True)
                if pin:
                    torch.cuda.synchronize(device)
            t_last[0] = time.perf_counter()

        t0 = t_last[0] = time.perf_counter()
        if run is handwritten_epoch:
            run(loader_or_images, np.arange(loader_images), epoch, consume)
        else:
            run(loader_or_images, epoch, consume)
        return time.perf_counter() - t0, sum(waited)

    with tempfile.TemporaryDirectory() as tmp:
        shape = (loader_images, 3, loader_image_size, loader_image_size)
        cache = np.lib.format.open_memmap(Path(tmp) / "cache.npy", mode="w+", dtype=np.uint8, shape=shape)
        for start in range(0, loader_images, 256):  # write in chunks: flat memory
            cache[start:start + 256] = np.random.default_rng(start).integers(0, 256, cache[start:start + 256].shape,
                                                                             dtype=np.uint8)
        cache.flush()
        del cache
        images = np.load(Path(tmp) / "cache.npy", mmap_mode="r")
        rows = np.arange(loader_images)
        dataset = training_data.ImageRows([images])
        variants = {"hand-written (thread prefetch)": (handwritten_epoch, images)}
        for workers in (0, 1, 2):
            sampler = training_data.GlobalBatchSampler(dataset, [rows], loader_batch_size, seed)
            loader = training_data.make_loader(dataset, sampler, device, workers)
            variants[f"DataLoader, {workers} worker{'s' * (workers != 1)}"] = (dataloader_epoch, loader)
            if workers == 0:
                variants["DataLoader, 0 workers, read-ahead thread"] = (read_ahead_epoch, loader)
        loader_times = {(name, normalise): [] for name in variants for normalise in (False, True)}
        for run, arg in variants.values():  # warm-up: page cache, worker start-up, allocator
            time_epoch(run, arg, 0, True)
        for r in range(loader_rounds):
            for (name, normalise), times in loader_times.items():
                times.append(time_epoch(*variants[name], r + 1, normalise))
        del variants, loader, dataset, images
    loader_rows = []
    for (name, normalise), times in loader_times.items():
        best = min(t for t, _ in times)
        reference = min(t for t, _ in loader_times[("hand-written (thread prefetch)", normalise)])
        loader_rows.append({"consumer": "normalise" if normalise else "receive only", "variant": name,
                            "epoch_s_best": best, "epoch_s_median": float(np.median([t for t, _ in times])),
                            "waited_s_median": float(np.median([w for _, w in times])),
                            "images_per_s": loader_images / best, "vs_hand_written": best / reference})
    loader_rows.sort(key=lambda row: row["consumer"] == "normalise")
    loader_text = (f"# Loader benchmark\n\none epoch of {loader_images} images ({loader_image_size} px uint8 memmap, "
                   f"page cache warm), batch {loader_batch_size}, device {device}; consumer 'receive only' "
                   f"takes each batch, 'normalise' also runs the loop's uint8 -> float step; best and median of "
                   f"{loader_rounds} epochs per variant, variants interleaved; torch threads {torch.get_num_threads()}"
                   "\n\n" + outputs.format_table(loader_rows, float_format="{:.3g}") + "\n")
    print(loader_text)
    if write_summary:
        outputs.save_text(Path(out_dir) / "loader_benchmark.md", loader_text, config)
        outputs.save_json(Path(out_dir) / "loader_benchmark.json", {"options": config, "rows": loader_rows}, config)
    if set(benchmarks) == {"loader"}:
        sys.exit(0)

sizes = dict(n_train=n_train, n_val=n_val, n_features=n_features, n_voxels=n_voxels, n_alphas=n_alphas, seed=seed)
print(f"synthetic data: {sizes}")
runs = {}


def torch_threads():
    import torch
    return torch.get_num_threads()


def child(method, repeats):
    t0 = time.perf_counter()
    res = run_in_child(method=method, repeats=repeats, **sizes)
    print(f"  {method:16s} fits {', '.join(f'{t:.2f}' for t in res['times_s'])} s (cpu "
          f"{', '.join(f'{t:.1f}' for t in res['cpu_s'])} s)   peak RSS "
          f"{res['peak_rss_gb']:.2f} GB   (child {time.perf_counter() - t0:.0f} s)")
    runs.setdefault(method, []).append(res)


if "ridge" in benchmarks:
    print("(a) per-voxel-alpha ridge (ours) vs one fixed-alpha sklearn Ridge")
    for _ in range(rounds):
        child("ours", fits_per_child)
        child("sklearn_ridge", fits_per_child)
if "memory" in benchmarks and "ours" not in runs:
    child("ours", 1)
if "ridgecv" in benchmarks:
    print("(b) sklearn RidgeCV(alpha_per_target=True), once")
    child("sklearn_ridgecv", 1)


def timing(method):
    """(best, median) wall seconds over all fits of a method: under background load on a shared
    machine the best of several runs estimates the cost of the computation (timeit's advice)."""
    times = [t for r in runs[method] for t in r["times_s"]]
    return float(np.min(times)), float(np.median(times))


rows, results = [], {"options": config, "runs": runs}
if "ours" in runs and "sklearn_ridge" in runs:
    (ours_s, ours_med), (sk_s, sk_med) = timing("ours"), timing("sklearn_ridge")
    rows.append(("(a) fit time: ours (per-voxel alpha) vs sklearn Ridge (fixed alpha)",
                 f"{ours_s:.2f} s (median {ours_med:.2f})",
                 f"{sk_s:.2f} s (median {sk_med:.2f}; {runs['sklearn_ridge'][0]['dtype']}, "
                 f"{runs['sklearn_ridge'][0]['solver']})",
                 f"ours/sklearn = {ours_s / sk_s:.2f} (medians {ours_med / sk_med:.2f})", "<= 2", ours_s / sk_s <= 2))
if "sklearn_ridgecv" in runs:
    ours_s, ours_med = timing("ours") if "ours" in runs else (float("nan"), float("nan"))
    cv_s = timing("sklearn_ridgecv")[0]
    rows.append(("(b) fit time: ours vs sklearn RidgeCV(alpha_per_target), run once",
                 f"{ours_s:.2f} s (median {ours_med:.2f})",
                 f"{cv_s:.2f} s ({runs['sklearn_ridgecv'][0]['dtype']}), peak RSS "
                 f"{runs['sklearn_ridgecv'][0]['peak_rss_gb']:.2f} GB",
                 f"RidgeCV/ours = {cv_s / ours_s:.1f} (vs our median {cv_s / ours_med:.1f})", ">= 10",
                 cv_s / ours_s >= 10))
if "pearson" in benchmarks:
    import scipy.stats
    print(f"(c) Pearson r of {n_voxels} voxels over {n_test} images")
    rng = np.random.default_rng(seed)
    y_true = rng.standard_normal((n_test, n_voxels), dtype=np.float32)
    y_pred = (0.3 * y_true + rng.standard_normal((n_test, n_voxels), dtype=np.float32)).astype(np.float32)
    vec_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        r_vec = encoding.pearson_r(y_true, y_pred)
        vec_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    r_loop = np.array([scipy.stats.pearsonr(y_true[:, j], y_pred[:, j])[0] for j in range(n_voxels)])
    loop_s = time.perf_counter() - t0
    vec_s = float(np.median(vec_times))
    results["pearson"] = {"vectorised_s": vec_times, "scipy_loop_s": loop_s,
                          "max_abs_diff": float(np.abs(r_vec - r_loop).max())}
    rows.append(("(c) Pearson r: vectorised vs scipy.stats.pearsonr loop", f"{vec_s * 1000:.0f} ms",
                 f"{loop_s:.2f} s (max |diff| {results['pearson']['max_abs_diff']:.1e})",
                 f"loop/vectorised = {loop_s / vec_s:.0f}", ">= 100", loop_s / vec_s >= 100))
if "memory" in benchmarks:
    peak = max(r["peak_rss_gb"] for r in runs["ours"])
    data_gb = max(r["data_rss_gb"] for r in runs["ours"])
    rows.append(("(d) peak RSS of the process fitting ours (data included)", f"{peak:.2f} GB",
                 f"{data_gb:.2f} GB after making the data", "", "< 6 GB", peak < 6))
if "ours" in runs:
    results["ours_alpha_summary"] = runs["ours"][0]["alpha_summary"]

header = "| benchmark | ours | reference | ratio | target | met |\n|---|---|---|---|---|---|\n"
table = header + "".join(f"| {b} | {o} | {ref} | {ratio} | {tgt} | {'-' if met is None else 'yes' if met else 'NO'} |\n"
                         for b, o, ref, ratio, tgt, met in rows)
text = (f"# Encoding-core benchmark\n\nsynthetic data {sizes}; best (and median) of {rounds} child processes "
        f"x {fits_per_child} fits per method, methods interleaved; ours in torch float32 on "
        f"{torch_threads()} threads; Pearson: median of 5\n\n" + table)
if "ours" in runs:
    text += f"\nalphas chosen by ours: {results['ours_alpha_summary']}\n"
print()
print(text)
if write_summary:
    results["table"] = [dict(zip(("benchmark", "ours", "reference", "ratio", "target", "met"), r)) for r in rows]
    outputs.save_text(Path(out_dir) / "benchmark.md", text, config)
    outputs.save_json(Path(out_dir) / "benchmark.json", results, config)
    print(f"wrote {Path(out_dir) / 'benchmark.md'} and benchmark.json")
