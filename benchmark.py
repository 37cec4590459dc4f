"""Time the encoding core against sklearn and himalaya on synthetic data with a planted low-rank linear signal.

(a) our ridge, per-voxel alpha chosen on the val split, vs one fixed-alpha sklearn Ridge fit (target <= 2x);
(b) our ridge, per-voxel alpha by GCV on the train split, vs the same sklearn Ridge fit (target <= 1.25x);
(c) himalaya RidgeCV(local_alpha=True) given the same train/val split vs (a) and (b) (target: ours >= 3x
    faster; skipped, and said so, when himalaya is not installed: it is a benchmark-only package);
(d) ours vs sklearn RidgeCV(alphas, alpha_per_target=True) (target: ours >= 10x faster);
(e) vectorised pearson_r vs a scipy.stats.pearsonr loop over voxels (target >= 100x);
(f) peak memory (RSS) of the process running our fit, data included (target < 6 GB);
and how often GCV and val selection choose the same alpha, with the median |val r difference| between them.
(training, loader, gpu) run benchmark_training.py: training images/s per variant and batch delivery on this CPU
(--benchmarks=training,loader), or everything on one GPU with the real settings (--benchmarks=gpu).
(backbones) runs benchmark_backbones.py: extraction and training images/s, peak memory and the full-size search cost
of alexnet, resnet18, resnet50, vit_b_16 and convnext_tiny at 224 px.
Every fit runs in a fresh child process (its own peak RSS; no torch/OpenBLAS thread pools spinning
against each other) and the methods alternate over rounds, so background load hits them alike.
All libraries get the same float32 arrays; the table says what dtype each computed in.
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
benchmarks = ["ridge", "gcv", "himalaya", "ridgecv", "pearson", "memory"]  # which to run
rounds = 3                       # child processes per ridge method, interleaved
fits_per_child = 3               # timed fits in each child (the first includes library start-up)
himalaya_backend = "numpy"       # himalaya backend on CPU: numpy (measured 1.1-1.3x faster here than torch)
himalaya_fits = 1                # himalaya fits (~150 s each here), one per child, in the first rounds
write_summary = True             # write benchmark.md and benchmark.json to out_dir
child = ""                       # internal: JSON of one timed fit, run in a fresh process by the parent
# ---------------------------------------------------------------------
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import encoding
import options
import outputs
import synthetic_data

KNOWN = ("ridge", "gcv", "himalaya", "ridgecv", "pearson", "memory", "training", "loader", "gpu", "backbones")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def one_fit(method: str, data: dict, alphas, backend: str):
    """Fit one model on the synthetic data -> (fitted model, info about dtype/solver)."""
    if method == "ours":
        fit = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], alphas=alphas)
        return fit, {"dtype": "float32", "alpha_summary": fit.alpha_summary()}
    if method == "ours_gcv":
        fit = encoding.fit_ridge(data["X_train"], data["Y_train"], alphas=alphas, selection="gcv")
        return fit, {"dtype": "float32", "alpha_summary": fit.alpha_summary()}
    if method == "sklearn_ridge":
        from sklearn.linear_model import Ridge
        fit = Ridge(alpha=encoding.PAPER_ALPHA_UNTUNED).fit(data["X_train"], data["Y_train"])
        return fit, {"dtype": str(fit.coef_.dtype), "solver": fit.solver_}
    if method == "sklearn_ridgecv":
        from sklearn.linear_model import RidgeCV
        fit = RidgeCV(alphas=alphas, alpha_per_target=True).fit(data["X_train"], data["Y_train"])
        return fit, {"dtype": str(fit.coef_.dtype)}
    if method == "himalaya":
        # the same split: train rows fit, val rows score (Pearson r like ours); himalaya then refits
        # the chosen alphas on train + val, as its RidgeCV always does
        from himalaya.backend import set_backend
        from himalaya.ridge import RidgeCV
        from himalaya.scoring import correlation_score
        from sklearn.model_selection import PredefinedSplit
        set_backend(backend)
        split = PredefinedSplit(np.r_[np.full(len(data["X_train"]), -1), np.zeros(len(data["X_val"]), int)])
        fit = RidgeCV(alphas=alphas, fit_intercept=True, cv=split,
                      solver_params=dict(local_alpha=True, score_func=correlation_score)
                      ).fit(data["X_trainval"], data["Y_trainval"])
        return fit, {"dtype": f"float32 ({backend} backend)"}
    raise ValueError(f"unknown method {method!r}")


def time_ridge_fit(method: str, n_train: int, n_val: int, n_features: int, n_voxels: int, n_alphas: int,
                   seed: int = 0, repeats: int = 3, backend: str = "numpy") -> dict:
    """Make synthetic data, then time `repeats` fits of one method (see one_fit). Returns times, peak
    memory, dtypes. Meant to run in a fresh process (run_in_child) so the peak memory is this fit's alone.
    """
    data = synthetic_data.make_synthetic_encoding_data(n_train, n_val, 0, n_features, n_voxels, seed=seed)
    if method == "himalaya":  # data preparation, not timed
        data["X_trainval"] = np.concatenate([data["X_train"], data["X_val"]])
        data["Y_trainval"] = np.concatenate([data["Y_train"], data["Y_val"]])
    alphas = np.logspace(1, 7, n_alphas)
    data_rss = peak_rss_gb()
    times, cpu_times, info = [], [], {}
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fit, info = one_fit(method, data, alphas, backend)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del fit
    return {"method": method, "times_s": times, "cpu_s": cpu_times, "median_s": float(np.median(times)),
            "data_rss_gb": data_rss, "peak_rss_gb": peak_rss_gb(), **info}


def selection_agreement(n_train: int, n_val: int, n_features: int, n_voxels: int, n_alphas: int,
                        seed: int = 0) -> dict:
    """How often GCV (train split) and val selection choose the same alpha, and the val r they reach."""
    data = synthetic_data.make_synthetic_encoding_data(n_train, n_val, 0, n_features, n_voxels, seed=seed)
    alphas = np.logspace(1, 7, n_alphas)
    by_val = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], alphas=alphas,
                                compute_coef=False)
    by_gcv = encoding.fit_ridge(data["X_train"], data["Y_train"], alphas=alphas, selection="gcv", compute_coef=False)
    r_val = by_val.best_val_scores_.astype(np.float64)
    r_gcv = by_val.val_scores_[np.searchsorted(alphas, by_gcv.alphas_), np.arange(n_voxels)].astype(np.float64)
    diff = np.abs(r_val - r_gcv)
    return {"same_alpha_fraction": float(np.mean(by_val.alphas_ == by_gcv.alphas_)),
            "median_abs_val_r_diff": float(np.nanmedian(diff)), "max_abs_val_r_diff": float(np.nanmax(diff)),
            "median_val_r_val_selection": float(np.nanmedian(r_val)),
            "median_val_r_gcv_selection": float(np.nanmedian(r_gcv)),
            "gcv_alpha_summary": by_gcv.alpha_summary(), "val_alpha_summary": by_val.alpha_summary()}


def run_in_child(job: dict) -> dict:
    """time_ridge_fit(**job) (or selection_agreement) in a fresh `python benchmark.py --child=...` process."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--child={json.dumps(job)}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {job} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
    return json.loads(line[len("@@RESULT@@"):])


config = options.apply_options(globals())
if child:
    job = json.loads(child)
    result = selection_agreement(**job["sizes"]) if job.get("agreement") else time_ridge_fit(**job)
    print("@@RESULT@@" + json.dumps(result))
    sys.exit(0)
unknown = set(benchmarks) - set(KNOWN)
if unknown:
    raise options.OptionsError(f"--benchmarks: unknown {sorted(unknown)}; choose from {', '.join(KNOWN)}")
if himalaya_backend not in ("numpy", "torch"):
    raise options.OptionsError(f"--himalaya_backend={himalaya_backend}: expected numpy or torch")


# ---- backbones: timed by benchmark_backbones.py in its own process ----
if "backbones" in benchmarks:
    if subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "benchmark_backbones.py"),
                       f"--out_dir={out_dir}", f"--write_summary={str(write_summary).lower()}"]).returncode:
        sys.exit(1)
    if set(benchmarks) <= {"backbones"}:
        sys.exit(0)

# ---- training, loader, gpu: timed by benchmark_training.py in its own process ----
delegated = [name for name in ("training", "loader", "gpu") if name in benchmarks]
if delegated:
    command = [sys.executable, str(Path(__file__).resolve().parent / "benchmark_training.py"), f"--out_dir={out_dir}"]
    if "gpu" in delegated:  # one GPU, the real settings: 224 px, batch 1024, the whole image cache
        command += ["--device=cuda", "--benchmarks=training,ridge,loader"]
    else:
        command += ["--device=cpu", "--batch_size=64", "--steps=3", "--warmup=1",
                    "--benchmarks=" + ",".join(d for d in delegated),
                    "--variants=fp32,fp32-cl,bf16-cl,bf16-cl-resident"]
    if subprocess.run(command).returncode:
        sys.exit(1)
    if set(benchmarks) <= {"training", "loader", "gpu", "backbones"}:
        sys.exit(0)

sizes = dict(n_train=n_train, n_val=n_val, n_features=n_features, n_voxels=n_voxels, n_alphas=n_alphas, seed=seed)
print(f"synthetic data: {sizes}")
has_himalaya = importlib.util.find_spec("himalaya") is not None
if "himalaya" in benchmarks and not has_himalaya:
    print("himalaya is NOT installed: skipping (c) (a benchmark-only package: `.venv/bin/python -m pip install "
          "himalaya` to run it)")
runs = {}


def blas_threads() -> int:
    """Threads of numpy's BLAS (ours on CPU and sklearn both multiply through it)."""
    from threadpoolctl import threadpool_info
    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)


def run_child(method, repeats):
    t0 = time.perf_counter()
    res = run_in_child(dict(method=method, repeats=repeats, backend=himalaya_backend, **sizes))
    print(f"  {method:16s} fits {', '.join(f'{t:.2f}' for t in res['times_s'])} s (cpu "
          f"{', '.join(f'{t:.1f}' for t in res['cpu_s'])} s)   peak RSS "
          f"{res['peak_rss_gb']:.2f} GB   (child {time.perf_counter() - t0:.0f} s)")
    runs.setdefault(method, []).append(res)


interleaved = [m for b, m in (("ridge", "ours"), ("gcv", "ours_gcv"), ("himalaya", "himalaya")) if b in benchmarks
               and (m != "himalaya" or has_himalaya)]
if interleaved:
    interleaved.append("sklearn_ridge")
    print(f"ridge fits, interleaved: {', '.join(interleaved)}")
    for i in range(rounds):
        for method in interleaved:
            if method != "himalaya":
                run_child(method, fits_per_child)
            elif i < himalaya_fits:
                run_child(method, 1)
if "memory" in benchmarks and "ours" not in runs:
    run_child("ours", 1)
if "ridgecv" in benchmarks:
    print("sklearn RidgeCV(alpha_per_target=True), once")
    run_child("sklearn_ridgecv", 1)


def timing(method):
    """(best, median) wall seconds over all fits of a method: under background load on a shared
    machine the best of several runs estimates the cost of the computation (timeit's advice)."""
    times = [t for r in runs[method] for t in r["times_s"]]
    return float(np.min(times)), float(np.median(times))


def cell(method):
    best, med = timing(method)
    return f"{best:.2f} s (median {med:.2f})"


rows, results = [], {"options": config, "runs": runs}
labels = {"ours": "val selection", "ours_gcv": "GCV selection"}
if "sklearn_ridge" in runs:
    sk_s, sk_med = timing("sklearn_ridge")
    sk = runs["sklearn_ridge"][0]
    for method, name, target in (("ours", "(a)", 2.0), ("ours_gcv", "(b)", 1.25)):
        if method in runs:
            ours_s, ours_med = timing(method)
            rows.append((f"{name} fit time: ours ({labels[method]}, {n_alphas} alphas) vs sklearn Ridge (fixed alpha)",
                         cell(method), f"{sk_s:.2f} s (median {sk_med:.2f}; {sk['dtype']}, {sk['solver']})",
                         f"ours/sklearn = {ours_s / sk_s:.2f} (medians {ours_med / sk_med:.2f})", f"<= {target:g}",
                         ours_s / sk_s <= target))
if "himalaya" in benchmarks:
    for method in ("ours", "ours_gcv"):
        if method not in runs:
            continue
        if "himalaya" not in runs:
            rows.append((f"(c) fit time: ours ({labels[method]}) vs himalaya RidgeCV(local_alpha)", cell(method),
                         "himalaya not installed: skipped", "", ">= 3", None))
            continue
        ours_s, ours_med = timing(method)
        hi_s, hi_med = timing("himalaya")
        rows.append((f"(c) fit time: ours ({labels[method]}) vs himalaya RidgeCV(local_alpha), same split "
                     f"(it refits on train + val)", cell(method),
                     f"{hi_s:.2f} s (median {hi_med:.2f}; {runs['himalaya'][0]['dtype']})",
                     f"himalaya/ours = {hi_s / ours_s:.1f} (medians {hi_med / ours_med:.1f})", ">= 3",
                     hi_s / ours_s >= 3))
if "sklearn_ridgecv" in runs:
    ours_s, ours_med = timing("ours") if "ours" in runs else (float("nan"), float("nan"))
    cv_s = timing("sklearn_ridgecv")[0]
    rows.append(("(d) fit time: ours (val selection) vs sklearn RidgeCV(alpha_per_target), run once",
                 f"{ours_s:.2f} s (median {ours_med:.2f})",
                 f"{cv_s:.2f} s ({runs['sklearn_ridgecv'][0]['dtype']}), peak RSS "
                 f"{runs['sklearn_ridgecv'][0]['peak_rss_gb']:.2f} GB",
                 f"RidgeCV/ours = {cv_s / ours_s:.1f} (vs our median {cv_s / ours_med:.1f})", ">= 10",
                 cv_s / ours_s >= 10))
if "pearson" in benchmarks:
    import scipy.stats
    print(f"Pearson r of {n_voxels} voxels over {n_test} images")
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
    rows.append(("(e) Pearson r: vectorised vs scipy.stats.pearsonr loop", f"{vec_s * 1000:.0f} ms",
                 f"{loop_s:.2f} s (max |diff| {results['pearson']['max_abs_diff']:.1e})",
                 f"loop/vectorised = {loop_s / vec_s:.0f}", ">= 100", loop_s / vec_s >= 100))
if "memory" in benchmarks:
    peak = max(r["peak_rss_gb"] for r in runs["ours"])
    data_gb = max(r["data_rss_gb"] for r in runs["ours"])
    rows.append(("(f) peak RSS of the process fitting ours (data included)", f"{peak:.2f} GB",
                 f"{data_gb:.2f} GB after making the data", "", "< 6 GB", peak < 6))
if "ours" in runs:
    results["ours_alpha_summary"] = runs["ours"][0]["alpha_summary"]
if "ridge" in benchmarks and "gcv" in benchmarks:
    print("GCV vs val selection on the same data")
    results["gcv_vs_val"] = run_in_child({"agreement": True, "sizes": sizes})

header = "| benchmark | ours | reference | ratio | target | met |\n|---|---|---|---|---|---|\n"
table = header + "".join(f"| {b} | {o} | {ref} | {ratio} | {tgt} | {'-' if met is None else 'yes' if met else 'NO'} |\n"
                         for b, o, ref, ratio, tgt, met in rows)
text = (f"# Encoding-core benchmark\n\nsynthetic data {sizes}; best (and median) of {rounds} child processes "
        f"x {fits_per_child} fits per method (himalaya: {himalaya_fits} fit), methods interleaved; ours: "
        f"float32 products in numpy on CPU; BLAS on {blas_threads()} threads; Pearson: median of 5\n\n" + table)
if "gcv_vs_val" in results:
    agree = results["gcv_vs_val"]
    text += (f"\nGCV vs val selection: same alpha for {100 * agree['same_alpha_fraction']:.1f}% of voxels; "
             f"|val r difference| median {agree['median_abs_val_r_diff']:.2e}, "
             f"max {agree['max_abs_val_r_diff']:.3f}; "
             f"median val r {agree['median_val_r_val_selection']:.4f} (val selection, chosen on val) vs "
             f"{agree['median_val_r_gcv_selection']:.4f} (GCV)\n")
if "ours" in runs:
    text += f"\nalphas chosen by val selection: {results['ours_alpha_summary']}\n"
if "ours_gcv" in runs:
    text += f"alphas chosen by GCV: {runs['ours_gcv'][0]['alpha_summary']}\n"
print()
print(text)
if write_summary:
    results["table"] = [dict(zip(("benchmark", "ours", "reference", "ratio", "target", "met"), r)) for r in rows]
    outputs.save_text(Path(out_dir) / "benchmark.md", text, config)
    outputs.save_json(Path(out_dir) / "benchmark.json", results, config)
    print(f"wrote {Path(out_dir) / 'benchmark.md'} and benchmark.json")
