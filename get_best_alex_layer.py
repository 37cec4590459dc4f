"""Find the best untuned AlexNet layer for every ROI: PCA + ridge encoding, median Pearson r on the val split.

For each subject and hemisphere writes out_dir/best_layer/subjXX/{hemi}_best_layer.json (ROI -> layer),
{hemi}_layer_roi_scores.npy (layers x ROIs median r, NaN for empty ROIs) and a heatmap PNG.
Ridge alphas are chosen on a hold-out of the train split, so val only scores; the test split is never scored
here. One forward pass extracts every layer for all the subject's images (and the challenge test images when
the data has them), so later stages (generate_results.py, predict_test_images.py) reuse the cached features.
Tuned backbones get the same search in generate_results.py (tuned_layer="best").
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                             # everything derived goes here
subjects = []                               # [] = every subject in data_dir
hemispheres = ["lh", "rh"]                  # hemispheres to score
layers = []                                 # AlexNet layers to compare; [] = all 8 (models.ALEXNET_LAYERS)
weights = "IMAGENET1K_V1"                   # untuned AlexNet: IMAGENET1K_V1, none (random) or a .pth path
image_size = 224                            # pixels fed to AlexNet
pca_components = 1000                       # PCA size for wider layers (fitted on train only)
alphas = []                                 # ridge alpha grid (one chosen per voxel); [] = encoding.ALPHAS
layer_statistic = "median"                  # median | mean (2023 original) val r over an ROI's voxels
alpha_holdout = 0.1                         # fraction of train used to choose each voxel's alpha
split_seed = 0                              # seed of the train/val/test split (used once, then read back)
seed = 0                                    # PCA seed
batch_size = 128                            # images per forward pass
device = "auto"                             # auto (cuda if present), cpu, cuda, cuda:1, ...
# ---------------------------------------------------------------------
from pathlib import Path

import numpy as np

import encoding
import features
import models
import options
import outputs
import plots
import runtime
import study
import utils

config = options.apply_options(globals())
layers = list(layers or models.ALEXNET_LAYERS)
torch_device = runtime.resolve_device(device)
subject_list = utils.resolve_subjects(data_dir, subjects)
# validate every subject before writing anything
subject_data = {s: utils.load_subject(data_dir, s, hemispheres=hemispheres) for s in subject_list}

summary = []
for subject, d in subject_data.items():
    d.split = split = utils.get_split(out_dir, subject, d.image_paths, seed=split_seed)
    d.images = utils.load_image_cache(out_dir, subject, d.image_paths, size=image_size)
    challenge = utils.load_challenge_images(d.paths, out_dir, image_size)
    layer_features = features.layer_features(out_dir, subject, f"untuned:{weights}", layers,
                                             features.subject_image_sets(d, challenge_images=challenge),
                                             image_size, pca_components, seed, torch_device, batch_size)
    subject_out = Path(out_dir) / "best_layer" / utils.subject_dir_name(subject)
    for hemi in hemispheres:
        roi_indices = d.roi_voxel_indices[hemi]
        scores = study.layer_roi_scores(layer_features, d.fmri[hemi], split, roi_indices, alphas or encoding.ALPHAS,
                                        alpha_holdout, seed, torch_device, statistic=layer_statistic)
        best = study.best_layer_per_roi(scores, layers, roi_indices)
        outputs.save_json(subject_out / f"{hemi}_best_layer.json", best, config, subject=subject, hemisphere=hemi)
        outputs.save_npy(subject_out / f"{hemi}_layer_roi_scores.npy", scores, config, subject=subject,
                         hemisphere=hemi, rows=layers, columns=list(roi_indices),
                         metric=f"{layer_statistic} val Pearson r")
        fig = plots.plot_layer_roi_heatmap(scores, layers, list(roi_indices),
                                           f"{utils.subject_dir_name(subject)} {hemi}: untuned AlexNet")
        outputs.save_figure(subject_out / f"{hemi}_layer_roi_scores.png", fig, config)
        summary += [{"subject": subject, "hemisphere": hemi, "roi": roi, "best_layer": layer,
                     f"{layer_statistic}_val_r": float(np.nanmax(scores[:, list(roi_indices).index(roi)]))}
                    for roi, layer in best.items()]

outputs.save_csv(Path(out_dir) / "best_layer" / "best_layers.csv", summary, config)
print(outputs.format_table(summary, ["subject", "hemisphere", "roi", "best_layer", f"{layer_statistic}_val_r"]))
print(f"best layers written to {Path(out_dir) / 'best_layer'}")
