"""The layer search stage: the best layer per ROI of every feature set (untuned, tuned, pooled, external).

Every set gets the same search over `layers` (search.py): one forward pass per backbone for all layers, PCA fitted
on train for wide layers, unit-scaled features, ridge with one alpha per voxel, alphas and layers chosen on the val
split by cross-fitting its two halves; the test split is never scored here. Jobs: per subject one for the untuned
network (every ROI of both hemispheres) and one per external set; per subject, hemisphere, ROI and trained seed one
for each tuned backbone (pooled: the model of all subjects and the one trained without the encoded subject). Writes
out_dir/searches/... (one JSON per search, with its key of options; a heatmap per untuned search) and a summary.
Finished searches with a matching key are skipped (resume); --shard=i/n splits the jobs over processes.
generate_results.py and predict_test_images.py read these searches.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                             # everything derived goes here
subjects = []                               # [] = every subject in data_dir
hemispheres = ["lh", "rh"]                  # hemispheres to search
rois = []                                   # ROIs whose tuned models are searched; [] = all 31 (untuned: always all)
feature_sets = []                           # untuned | cl | reg | pooled-cl | pooled-reg | external:<name>;
                                            # [] = untuned and every tuned set with models in out_dir
seeds = []                                  # tuned models' seeds to search; [] = every seed trained
shard = "0/1"                               # i/n: this process runs jobs i, i+n, i+2n, ... of the search
resume = True                               # skip searches already saved with the same options
backbone = "alexnet"                        # the network (untuned, and the tuned models' backbone): alexnet (the
                                            # paper's) | a torchvision classifier (resnet50, vit_b_16, ...) |
                                            # timm:<name> | open_clip:<arch>/<tag> | tiny, tiny-vit (test stand-ins)
weights = "DEFAULT"                         # untuned network: DEFAULT (the weights' own: torchvision, timm or
                                            # open_clip cache) | a torchvision weights name (IMAGENET1K_V1) | none
                                            # (random init) | a local state dict (.pth, .safetensors)
checkpoint = "best"                         # tuned models: best (lowest val loss) | last (final epoch; keep_last)
pooled_h_method = "constant"                # which pooled CL models: constant (h = 5741) | average
features_dir = ""                           # external sets: features_dir/subjXX/<name>/{train,challenge}_<layer>.npy
layers = []                                 # layers compared (torchvision feature_extraction node names or module
                                            # paths); [] = the backbone's default ~8 (AlexNet: the paper's 8);
                                            # external sets: every train_<layer>.npy of theirs
image_size = 224                            # pixels fed to the network
pca_components = 1000                       # PCA size for wider layers (fitted on train only; each search JSON
                                            # states the reduction per layer)
alphas = []                                 # ridge alpha grid (one chosen per voxel); [] = encoding.ALPHAS
feature_scaling = "auto"                    # auto (unit variance for an alpha grid) | unit | none
layer_statistic = "median"                  # median | mean (2023 original) cross-fitted val r over an ROI's voxels
keep_search_features = False                # tuned: keep every searched layer's cached features (else the chosen)
split_seed = 0                              # seed of the train/val/test split (used once, then read back)
seed = 0                                    # PCA seed and the val halves
batch_size = 128                            # images per forward pass
device = "auto"                             # auto (cuda if present) | cpu | cuda | cuda:1
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import feature_sets as sets  # noqa: E402
import outputs  # noqa: E402
import paths  # noqa: E402
import plots  # noqa: E402
import search  # noqa: E402
import study as encoding_study  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

settings = encoding_study.StudySettings.from_options(config)
study = encoding_study.EncodingStudy(settings)
subject_list = utils.resolve_subjects(data_dir, subjects)
roi_list = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)
set_names = sets.check(feature_sets) if feature_sets else [sets.UNTUNED] + encoding_study.trained_sets(settings)
if any(sets.is_external(s) for s in set_names) and not features_dir:
    raise options.OptionsError("--feature_sets names external sets: give --features_dir")
shard_index = training.parse_shard(shard)

# data: validate every subject (split and image cache made once) before any search is written
for subject in subject_list:
    study.subject(subject)
jobs = encoding_study.search_jobs(study, set_names, subject_list, settings.hemispheres, roi_list)[
    shard_index[0]::shard_index[1]]

# the loop over search jobs: a saved search with the same options is kept
rows = []
for job in tqdm(jobs, desc="layer searches", unit="search"):
    name, subject, run_dir = job["feature_set"], job["subject"], job["run_dir"]
    files = [study.search_file(name, subject, hemi, run_dir) for hemi in job["hemispheres"]]
    key = study.search_key(name, subject, run_dir)
    if resume and all(search.saved_key(f) == key for f in files):
        status, seconds = "done", None
    else:
        status = "searched" if all(not f.is_file() for f in files) else "searched again (options changed)"
        seconds = study.run_search(name, subject, job["hemispheres"], run_dir, config, job["roi"])
    for hemi, path in zip(job["hemispheres"], files):
        saved = search.read_search(path, key, "")
        chosen = {roi: e["layer"] for roi, e in saved["rois"].items() if e["layer"]}
        rows.append({"feature_set": name, "subject": subject, "hemisphere": hemi, "roi": job["roi"] or "(all)",
                     "seed": job["seed"], "status": status, "seconds": seconds,
                     "layers_chosen": " ".join(sorted(set(chosen.values()))), "file": str(path)})
        if run_dir is None and status != "done":  # the layers x ROIs heatmap of an untuned / external search
            scores = [[saved["rois"][r]["scores"][layer] for r in saved["rois"]] for layer in saved["layers"]]
            outputs.save_figure(path.with_suffix(".png"), plots.plot_layer_roi_heatmap(
                np.array(scores, dtype=float), saved["layers"], list(saved["rois"]),
                f"{paths.subject_dir_name(subject)} {hemi}: {sets.label(name)}"), config)

# summary
i, n = shard_index
summary_path = Path(out_dir) / "searches" / ("summary.csv" if n == 1 else f"summary_shard-{i}-of-{n}.csv")
outputs.save_csv(summary_path, rows, config)
print(outputs.format_table(rows, ["feature_set", "subject", "hemisphere", "roi", "seed", "status", "seconds",
                                  "layers_chosen"], float_format="{:.1f}"))
print(f"{len(jobs)} search jobs; summary in {summary_path}")
