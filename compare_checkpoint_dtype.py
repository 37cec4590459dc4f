"""What storing finished checkpoints in bfloat16 (`checkpoint_dtype=bfloat16`) does to the results tables.

Copies a finished run's out_dir with every model's best.pt weights cast to bfloat16 (the same trained weights, half
the disk: what `--checkpoint_dtype=bfloat16` writes), runs the layer search and the single-subject results on the
original and on the copy with the same options, and compares the two tidy tables number by number: the largest
absolute difference per statistic, how many chosen layers differ, and the checkpoints' sizes. Writes
checkpoint_dtype.md / .json to report_dir.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "demo_data"           # the data the run was trained on
out_dir = "demo_out"             # a finished run (float32 best.pt); read, never modified
copy_dir = ""                    # where the bfloat16 copy goes; "" = <report_dir>/out_bfloat16
report_dir = "out/checkpoint_dtype"  # both runs' results and the report
stage_flags = ["--weights=none", "--image_size=64", "--hemispheres=lh", "--pooled_h_method=average"]
                                 # options given to get_best_alex_layer.py and generate_results.py (as the run's)
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

import csv  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import models  # noqa: E402
import outputs  # noqa: E402

REPO = Path(__file__).resolve().parent
source, report = Path(out_dir), Path(report_dir)
copy = Path(copy_dir) if copy_dir else report / "out_bfloat16"
checkpoints = sorted((source / "models").rglob("best.pt"))
if not checkpoints:
    raise options.DataError(f"{source / 'models'}: no best.pt; expected a finished run (make demo, or the training "
                            "scripts)")

# ---- the copy: models with bfloat16 weights; searches and feature caches left to be recomputed ----
shutil.rmtree(copy, ignore_errors=True)
shutil.copytree(source, copy, ignore=lambda folder, names: [n for n in names if n in ("searches", "features")
                                                             and Path(folder) == source])
sizes = {"float32": 0, "bfloat16": 0}
for path in tqdm(checkpoints, desc="checkpoints to bfloat16", unit="model"):
    ckpt = models.load_checkpoint(path)
    if ckpt.get("weights_dtype", "float32") != "float32":
        raise options.DataError(f"{path}: weights already in {ckpt['weights_dtype']}; expected a float32 run")
    ckpt["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    ckpt["weights_dtype"] = "bfloat16"
    target = copy / path.relative_to(source)
    outputs.atomic_write(target, lambda f: torch.save(ckpt, f))
    sizes["float32"] += path.stat().st_size
    sizes["bfloat16"] += target.stat().st_size


def run(script: str, *args):
    """One stage as its own process; a failure ends this script with that stage's last lines."""
    proc = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


tables = {}
for dtype, folder in (("float32", source), ("bfloat16", copy)):
    results = report / f"Results_{dtype}"
    common = [f"--data_dir={data_dir}", f"--out_dir={folder}", *stage_flags]
    if dtype == "bfloat16":  # the original's searches exist (make demo ran them); the copy's are new
        run("get_best_alex_layer.py", *common)
    run("generate_results.py", *common, f"--results_dir={results}", "--result_type=single-subj", "--map_sets=",
        "--map_comparisons=")
    with open(results / "single_subj_tidy.csv", newline="") as f:
        tables[dtype] = list(csv.DictReader(f))

# ---- the comparison, number by number ----
key_columns = ("subject", "hemisphere", "roi", "kind", "feature_set", "baseline", "statistic")
rows32 = {tuple(r[k] for k in key_columns): r for r in tables["float32"]}
rows16 = {tuple(r[k] for k in key_columns): r for r in tables["bfloat16"]}
if set(rows32) != set(rows16):
    raise options.DataError(f"the two runs' tables hold different rows ({len(set(rows32) ^ set(rows16))} differ)")
by_statistic: dict = {}
layers_differ = 0
for key, r32 in rows32.items():
    if key[3] == "set" and key[4] == "untuned":
        continue  # the untuned network has no checkpoint: identical by construction
    r16 = rows16[key]
    layers_differ += r32["layer"] != r16["layer"]
    for column in ("value", "p"):
        if r32[column] not in ("", "nan") and r16[column] not in ("", "nan"):
            name = f"{key[3]} {key[6]}" + (" (p)" if column == "p" else "")
            by_statistic.setdefault(name, []).append(abs(float(r32[column]) - float(r16[column])))
summary = {name: {"n": len(d), "max_abs_diff": float(np.max(d)), "median_abs_diff": float(np.median(d))}
           for name, d in sorted(by_statistic.items())}
lines = [f"# bfloat16 checkpoints vs float32: {len(checkpoints)} models of {source}", "",
         f"Checkpoints: {sizes['float32'] / 1e6:.1f} MB in float32, {sizes['bfloat16'] / 1e6:.1f} MB in bfloat16 "
         f"({sizes['bfloat16'] / sizes['float32']:.2f}x). Chosen layers that differ: {layers_differ} of "
         f"{sum(1 for k in rows32 if not (k[3] == 'set' and k[4] == 'untuned'))} rows of tuned sets and comparisons "
         "(rows of the untuned set, identical by construction, are left out).", "",
         "| statistic | numbers | max abs difference | median abs difference |", "|---|---|---|---|"]
lines += [f"| {name} | {s['n']} | {s['max_abs_diff']:.2e} | {s['median_abs_diff']:.2e} |"
          for name, s in summary.items()]
text = "\n".join(lines) + "\n"
outputs.save_text(report / "checkpoint_dtype.md", text, config)
outputs.save_json(report / "checkpoint_dtype.json", {"sizes_bytes": sizes, "layers_differ": layers_differ,
                                                     "statistics": summary}, config)
print(text)
