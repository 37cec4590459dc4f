"""A positive control for the whole method: on synthetic data, tuning must raise test r where the ROI's signal is
an image property the untuned backbone represents poorly, and must not where an ROI holds pure noise.

The dataset (official layout, one subject; small synthetic ROI masks): images whose four quadrants each carry a
luminance texture of random contrast (a nuisance) and an isoluminant red-green texture of random contrast; a signal
ROI (hV4) whose vertices are noisy mixtures of the four red-green contrasts (a colour-opponent layout code), and null
ROIs of pure noise. Every stage then runs as a user runs it: generate_voxel_roi_mappings.py, the untuned layer search,
CL and reg training of every control ROI, the tuned layer searches (get_best_alex_layer.py) and generate_results.py.
The table gives per ROI the test r of each set, the tuned-minus-untuned differences with bootstrap CIs and
permutation p-values, and CL retrieval against chance; with the null ROIs' p-values tested for uniformity.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
out_dir = "positive_control"   # the control's data/, out/ (models, searches), results/ and its table
backbone = "tiny"              # tiny (a small conv net, trained from scratch in seconds) | alexnet (random init)
image_size = 32                # side of the square images in px (the PNGs and the network input)
n_images = 2000                # images with fMRI (split 75 / 10 / 15 % into train / val / test)
n_null_rois = 12               # ROIs of pure noise (1-30), each trained and tested like the signal ROI
voxels_per_roi = 100           # vertices of each control ROI
signal_fraction = 0.5          # signal ROI: the share of each vertex's variance that is signal (its noise ceiling)
chroma = 0.5                   # red-green texture amplitude relative to the luminance texture's
epochs = 10                    # CL and reg training epochs
batch_size = 32                # training batch (small data: more steps per epoch; the paper: 1024)
cl_lr = 1e-3                   # CL Adam learning rate (paper: 1e-4, for ImageNet weights)
reg_lr = 1e-3                  # reg Adam learning rate (paper: 2.5e-5, for ImageNet weights)
layers = []                    # layers searched for every set; [] = the backbone's (tiny: 2,5; AlexNet's 8)
n_permutations = 1000          # permutations for the p-values (generate_results.py)
n_bootstrap = 1000             # bootstrap resamples for the CIs (generate_results.py)
seed = 0                       # images, voxel weights and noise
device = "auto"                # auto (cuda if present) | cpu | cuda
cpu_bf16 = True                # bfloat16 training autocast on CPUs with bf16 instructions (as the training scripts)
num_threads = 1                # torch CPU threads for every stage (0 = torch default; tiny networks: 1 is fastest)
overwrite = False              # replace a control made with other options in out_dir
# ---------------------------------------------------------------------
import options

if __name__ == "__main__":
    config = options.apply_options(globals())

import csv  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import outputs  # noqa: E402
import paths  # noqa: E402
import utils  # noqa: E402

SIGNAL_ROI = "hV4"             # a colour-selective visual area
NULL_ROIS = ("FFA-1", "PPA", "EBA", "VWFA-1", "OFA", "OPA", "FBA-1", "RSC", "FFA-2", "VWFA-2")
NULL_ROIS += tuple(r for r in utils.ROI_NAMES if r not in NULL_ROIS and r != SIGNAL_ROI)  # any name serves
TINY_LAYERS = ("2", "5")       # the tiny network's pooled conv output and its 1000-way linear layer
SETS = ("untuned", "reg", "cl")
REPO = Path(__file__).resolve().parent
DATASET_OPTIONS = ("image_size", "n_images", "n_null_rois", "voxels_per_roi", "signal_fraction", "chroma", "seed")
SPEED_OPTIONS = ("out_dir", "overwrite", "device", "num_threads")   # change neither the data nor the results


def run_key(opts: dict) -> dict:
    """The options a control's data, models and results depend on."""
    return {k: v for k, v in opts.items() if k not in SPEED_OPTIONS}


# ---- the dataset ----

def control_images(n: int, size: int, chroma: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """n x size x size x 3 uint8 images and their n x 4 red-green contrasts (one per quadrant, in 0..1).

    Each quadrant: a luminance texture of random contrast (nuisance) plus an isoluminant red-green texture of
    random contrast; blocks of 4 px, so resizing keeps the textures; a random mean colour per image (nuisance).
    """
    grid, half = size // 4, size // 8
    red_green = rng.uniform(0, 1, (n, 2, 2))
    luminance = rng.uniform(0.2, 1, (n, 2, 2))

    def per_quadrant(contrast):
        return np.repeat(np.repeat(contrast, half, 1), half, 2) * rng.normal(size=(n, grid, grid))

    lum, rg = per_quadrant(luminance), per_quadrant(red_green)
    rgb = np.stack([lum + chroma * rg, lum - chroma * rg, lum], axis=-1)
    image = np.clip(0.5 + rng.normal(0, 0.05, (n, 1, 1, 3)) + 0.15 * rgb, 0, 1)
    image = np.repeat(np.repeat(image, 4, 1), 4, 2)
    return np.round(255 * image).astype(np.uint8), red_green.reshape(n, 4)


def control_rois(n_null: int) -> list[str]:
    if not 1 <= n_null <= len(NULL_ROIS):
        raise options.OptionsError(f"--n_null_rois={n_null}: expected 1..{len(NULL_ROIS)}")
    return [SIGNAL_ROI, *NULL_ROIS[:n_null]]


def control_fmri(red_green: np.ndarray, n_vertices: int, signal: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Unit-variance responses: in the signal vertices sqrt(fraction) x a random mix of the z-scored red-green
    contrasts + sqrt(1 - fraction) x noise; elsewhere noise alone."""
    fmri = rng.normal(size=(len(red_green), n_vertices))
    code = (red_green - red_green.mean(0)) / red_green.std(0)
    mix = code @ rng.normal(size=(code.shape[1], len(signal)))
    mix /= mix.std(0)
    fmri[:, signal] = np.sqrt(fraction) * mix + np.sqrt(1 - fraction) * fmri[:, signal]
    return fmri.astype(np.float32)


def write_dataset(root: Path, opts: dict, run_options: dict | None = None) -> None:
    """The control's data in the official layout (subj01: PNGs, fMRI of both hemispheres, ROI masks and mappings,
    its noise ceiling) from the DATASET_OPTIONS in opts; built in a hidden sibling folder, renamed into place when
    complete. run_options: recorded in control.json (a later run with other options must start afresh)."""
    from PIL import Image
    rng = np.random.default_rng(opts["seed"])
    rois = control_rois(opts["n_null_rois"])
    images, red_green = control_images(opts["n_images"], opts["image_size"], opts["chroma"], rng)
    nsd = rng.choice(np.arange(1, 73000), size=opts["n_images"], replace=False)
    v = opts["voxels_per_roi"]
    n_vertices = v * (len(rois) + 1)                      # one block per ROI and one in no ROI
    tmp = root.with_name(f".{root.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    subject_dir = tmp / paths.subject_dir_name(1)
    image_dir = subject_dir / "training_split" / "training_images"
    image_dir.mkdir(parents=True)
    for i, (image, nsd_id) in enumerate(zip(images, nsd)):
        Image.fromarray(image).save(image_dir / f"train-{i + 1:04d}_nsd-{nsd_id:05d}.png", compress_level=1)
    roi_dir = subject_dir / "roi_masks"
    roi_dir.mkdir()
    for family in utils.ROI_FAMILIES:
        labels = np.zeros(n_vertices, dtype=np.int64)
        for k, roi in enumerate(rois):
            if utils.ROI_FAMILY_OF[roi] == family:
                labels[k * v:(k + 1) * v] = utils.ROIS_BY_FAMILY[family].index(roi) + 1
        for hemi in utils.HEMISPHERES:
            outputs.save_npy(roi_dir / f"{hemi}.{family}_challenge_space.npy", labels)
        mapping = {0: "Unknown", **{i: name for i, name in enumerate(utils.ROIS_BY_FAMILY[family], start=1)}}
        outputs.save_npy(roi_dir / f"mapping_{family}.npy", np.array(mapping, dtype=object))
    signal = np.arange(v)
    ceiling = np.zeros(n_vertices, dtype=np.float32)
    ceiling[signal] = opts["signal_fraction"]
    for hemi in utils.HEMISPHERES:
        fmri = control_fmri(red_green, n_vertices, signal, opts["signal_fraction"], rng)
        outputs.save_npy(subject_dir / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy", fmri)
        outputs.save_npy(subject_dir / "noise_ceiling" / f"{hemi}_noise_ceiling.npy", ceiling)
    outputs.save_json(tmp / "control.json", {"options": opts, "run_options": run_options, "rois": rois,
                                             "signal_roi": SIGNAL_ROI, "red_green_contrast": red_green.round(5)})
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)


# ---- the pipeline, stage by stage ----

def run_stage(script: str, args: list[str]) -> float:
    """Run a pipeline script in this process with these arguments, as its command line would (one torch start-up);
    the global state a script changes (argv, torch threads, excepthook) is restored. -> its wall-clock seconds."""
    import runpy

    import torch
    print(f"\n$ python {script} {shlex.join(args)}", flush=True)
    saved = sys.argv, torch.get_num_threads(), sys.excepthook
    sys.argv = [str(REPO / script), *args]
    started = time.perf_counter()
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv, threads, sys.excepthook = saved
        torch.set_num_threads(threads)
    return time.perf_counter() - started


def stage_commands(opts: dict, data: Path, out: Path, results: Path) -> list[tuple[str, list[str]]]:
    """The control's stages as (script, arguments), in order."""
    rois = ",".join(control_rois(opts["n_null_rois"]))
    layers = [str(layer) for layer in opts["layers"]] or (list(TINY_LAYERS) if opts["backbone"] == "tiny" else [])
    common = [f"--data_dir={data}", f"--out_dir={out}", f"--backbone={opts['backbone']}", "--weights=none",
              f"--image_size={opts['image_size']}", f"--device={opts['device']}"]
    study = [*common, "--hemispheres=lh", *([f"--layers={','.join(layers)}"] if layers else [])]
    train = [*common, "--subjects=1", "--hemispheres=lh", f"--rois={rois}", f"--epochs={opts['epochs']}",
             f"--batch_size={opts['batch_size']}", f"--cpu_bf16={str(opts['cpu_bf16']).lower()}",
             f"--num_threads={opts['num_threads']}"]
    return [("generate_voxel_roi_mappings.py", [f"--data_dir={data}", f"--out_dir={out}"]),
            ("get_best_alex_layer.py", [*study, "--feature_sets=untuned"]),
            ("cl_model_training_all_rois.py", [*train, f"--lr={opts['cl_lr']}"]),
            ("reg_model_training_all_rois.py", [*train, f"--lr={opts['reg_lr']}"]),
            ("get_best_alex_layer.py", [*study, "--feature_sets=cl,reg", f"--rois={rois}"]),
            ("generate_results.py", [*study, f"--results_dir={results}", "--result_type=single-subj",
                                     f"--rois={rois}", "--feature_sets=untuned,reg,cl",
                                     "--comparisons=cl:untuned,reg:untuned,cl:reg",
                                     f"--n_permutations={opts['n_permutations']}",
                                     f"--n_bootstrap={opts['n_bootstrap']}"])]


# ---- the table ----

def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def control_table(result_rows: list[dict], signal_fraction: float) -> list[dict]:
    """One row per control ROI from generate_results.py's single-subject rows: r per set, each tuned set's mean r
    gain over untuned with its 95% CI and permutation p, CL top-1 retrieval with its CI, chance and control."""
    rows = []
    for r in result_rows:
        kind = "signal" if r["roi"] == SIGNAL_ROI else "null"
        row = {"roi": r["roi"], "kind": kind, "n_voxels": int(r["n_voxels"]), "n_test_images":
               int(r["n_test_images"]), "ceiling_r": float(np.sqrt(signal_fraction)) if kind == "signal" else 0.0}
        for s in SETS:
            row[f"mean_r_{s}"] = _number(r.get(f"mean_r_{s}"))
            row[f"layer_{s}"] = r.get(f"layer_{s}", "")
        for s in ("reg", "cl"):
            for column in ("", "_ci_low", "_ci_high"):
                row[f"gain_{s}{column}"] = _number(r.get(f"mean_diff_{s}_vs_untuned{column}"))
            row[f"p_{s}"] = _number(r.get(f"perm_p_mean_{s}_vs_untuned"))
            row[f"p_median_{s}"] = _number(r.get(f"perm_p_median_{s}_vs_untuned"))
        top1 = next((k for k in r if k.startswith("top1_of_") and k.endswith("_cl") and "_all_" not in k), None)
        if top1:
            row["cl_top1"] = _number(r[top1])
            row["cl_top1_ci_low"], row["cl_top1_ci_high"] = _number(r[f"{top1}_ci_low"]), _number(r[f"{top1}_ci_high"])
            row["cl_top1_shuffled"] = _number(r[f"control_{top1}"])
            row["cl_top1_chance"] = _number(r[f"chance_{top1[:-3]}"])
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> dict:
    """What the control must show: signal ROI gains with p < 0.05 and CL retrieval above chance; null ROIs'
    p-values (reg and CL vs untuned, mean r) consistent with uniform (Kolmogorov-Smirnov)."""
    from scipy import stats
    signal = next(r for r in rows if r["kind"] == "signal")
    null_p = [r[k] for r in rows if r["kind"] == "null" for k in ("p_reg", "p_cl")]
    null_p = [p for p in null_p if np.isfinite(p)]
    return {
        "signal_cl_gain": bool(signal["gain_cl"] > 0 and signal["p_cl"] < 0.05),
        "signal_reg_gain": bool(signal["gain_reg"] > 0 and signal["p_reg"] < 0.05),
        "signal_cl_retrieval_above_chance": bool(signal.get("cl_top1_ci_low", np.nan) > signal.get(
            "cl_top1_chance", np.nan)),
        "null_p_values": null_p,
        "null_share_below_0.05": float(np.mean(np.asarray(null_p) < 0.05)) if null_p else float("nan"),
        "null_uniformity_ks_p": float(stats.kstest(null_p, "uniform").pvalue) if len(null_p) > 1 else float("nan"),
    }


def markdown(rows: list[dict], checks: dict) -> str:
    def ci(row, name):
        return f"{row[name]:+.3f} [{row[name + '_ci_low']:+.3f}, {row[name + '_ci_high']:+.3f}]"

    lines = ["| ROI | kind | voxels | ceiling r | untuned r | reg r | CL r | reg - untuned [95% CI] | p | "
             "CL - untuned [95% CI] | p | CL top-1 [95% CI] | shuffled | chance |", "|" + "---|" * 14]
    for r in rows:
        retrieval = "– | – | –" if "cl_top1" not in r else (
            f"{r['cl_top1']:.3f} [{r['cl_top1_ci_low']:.3f}, {r['cl_top1_ci_high']:.3f}] | "
            f"{r['cl_top1_shuffled']:.3f} | {r['cl_top1_chance']:.3f}")
        lines.append(f"| {r['roi']} | {r['kind']} | {r['n_voxels']} | {r['ceiling_r']:.2f} | "
                     f"{r['mean_r_untuned']:.3f} | {r['mean_r_reg']:.3f} | {r['mean_r_cl']:.3f} | "
                     f"{ci(r, 'gain_reg')} | {r['p_reg']:.3f} | {ci(r, 'gain_cl')} | {r['p_cl']:.3f} | {retrieval} |")
    p = checks["null_p_values"]
    return ("\n".join(lines) + "\n\n"
            f"Signal ROI: CL gain with p < 0.05: {checks['signal_cl_gain']}; reg gain with p < 0.05: "
            f"{checks['signal_reg_gain']}; CL top-1 retrieval CI above chance: "
            f"{checks['signal_cl_retrieval_above_chance']}.\n"
            f"Null ROIs: {len(p)} permutation p-values (reg and CL vs untuned, mean r), "
            f"{checks['null_share_below_0.05']:.0%} below 0.05, Kolmogorov-Smirnov test against uniform p = "
            f"{checks['null_uniformity_ks_p']:.2f}; sorted: {', '.join(f'{x:.2f}' for x in sorted(p))}.\n")


def run_control(opts: dict) -> tuple[list[dict], dict]:
    """Write the dataset (or reuse one made with the same options), run every stage, write and return the table."""
    root = Path(opts["out_dir"])
    data, out, results = root / "data", root / "out", root / "results"
    dataset_options = {k: opts[k] for k in DATASET_OPTIONS}
    made = data / "control.json"
    if made.is_file() and json.loads(made.read_text())["run_options"] != run_key(opts):
        if not opts["overwrite"]:
            raise options.DataError(f"{root}: holds a control made with other options; pass --overwrite=true to "
                                    "replace it or choose another --out_dir")
        for folder in (data, out, results):
            shutil.rmtree(folder, ignore_errors=True)
    import torch
    started, threads = time.perf_counter(), torch.get_num_threads()
    if not made.is_file():
        write_dataset(data, dataset_options, run_key(opts))
    seconds = {"dataset": round(time.perf_counter() - started, 1)}
    try:
        if opts["num_threads"]:  # every stage, also those without the option (searches, results)
            torch.set_num_threads(opts["num_threads"])
        for k, (script, args) in enumerate(stage_commands(opts, data, out, results)):
            seconds[f"{k + 1} {script}"] = round(run_stage(script, args), 1)
    finally:
        torch.set_num_threads(threads)
    with open(results / paths.subject_dir_name(1) / "single_subj_lh.csv", newline="") as fh:
        rows = control_table(list(csv.DictReader(fh)), opts["signal_fraction"])
    checks = {**verdict(rows), "stage_seconds": seconds}
    outputs.save_csv(root / "positive_control.csv", rows, opts)
    outputs.save_text(root / "positive_control.md", "## Positive control: test-split r per ROI (subject 1, lh)\n\n"
                      + markdown(rows, checks), opts, checks=checks)
    return rows, checks


if __name__ == "__main__":
    started = time.perf_counter()
    table, result = run_control(config)
    print("\n" + markdown(table, result))
    print("seconds per stage: " + ", ".join(f"{k}: {v:.0f}" for k, v in result["stage_seconds"].items()))
    print(f"positive control written to {Path(out_dir) / 'positive_control.md'} in "
          f"{time.perf_counter() - started:.0f} s")
