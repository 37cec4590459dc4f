"""The paper's results: untuned vs reg-tuned vs CL-tuned AlexNet features.

--result_type=single-subj          per-ROI test accuracy of the three feature sets, % voxels improved, statistics
--result_type=cross-subj           each subject's tuned backbone used for every other subject (N x N matrices)
--result_type=classification-task  linear probes of the backbones on an image-classification dataset
--result_type=all                  all three
Tables (.csv/.npy/.md) and figures (.png) go to results_dir, each with a .meta.json sidecar.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                             # splits, caches, models and best layers from earlier stages
results_dir = "Results"                     # where tables and figures are written
result_type = "all"                         # single-subj | cross-subj | classification-task | all
subjects = []                               # [] = every subject in data_dir
hemispheres = ["lh", "rh"]                  # hemispheres to evaluate
rois = []                                   # single-subj ROIs; [] = all 31 (empty ones reported)
cross_subj_rois = ["V1v", "FFA-1", "PPA", "EBA", "VWFA-1"]  # ROIs for the cross-subject matrices
methods = ["cl", "reg"]                     # tuned models to compare
checkpoint = "best"                         # best (val-selected) or last checkpoint of each model
weights = "IMAGENET1K_V1"                   # untuned AlexNet weights (as in get_best_alex_layer.py)
image_size = 224                            # pixels fed to AlexNet (as in training)
tuned_layer = "best"                        # best (each tuned backbone searched over `layers`, like the untuned
                                            # one) | untuned (the ROI's best untuned layer: 2023 original) | a layer
layers = ["features.2", "features.5", "features.7", "features.9", "features.12",
          "classifier.2", "classifier.5", "classifier.6"]  # layers searched for tuned backbones (tuned_layer=best)
alpha_holdout = 0.1                         # fraction of train that chooses alphas in the layer search
keep_search_features = False                # keep every searched layer's cached features (else only the chosen)
pca_components = 1000                       # PCA size for wide untuned layers (fitted on train only)
alpha_mode = "per-voxel"                    # per-voxel (alpha chosen on val) | paper (fixed 1e3 / 1e4)
alphas = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7]  # ridge alpha grid in per-voxel mode
n_bootstrap = 1000                          # bootstrap resamples of test images for CIs
split_seed = 0                              # seed of the train/val/test split (read back from out_dir)
seed = 0                                    # PCA, bootstrap and probe-split seed
batch_size = 128                            # images per forward pass
device = "auto"                             # auto (cuda if present), cpu, cuda, ...
classification_dataset = "imagefolder"      # imagefolder | caltech256 | places365 | sun397 | imagenet
classification_root = ""                    # dataset folder; "" = <data_dir>/imagefolder (the demo's)
classification_max_per_class = 100          # images per class used for the probe
classification_subjects = []                # backbones' subjects for the probe; [] = all
classification_rois = ["FFA-1", "PPA", "EBA", "VWFA-1", "V1v"]  # backbones' ROIs for the probe
probe_layer = "classifier.6"                # layer whose features the linear probe reads
probe_test_fraction = 0.15                  # held-out fraction of the probe's seeded split
# ---------------------------------------------------------------------
from pathlib import Path

import numpy as np

import features
import models
import options
import outputs
import plots
import probes
import results_utils
import study as encoding_study
import utils

config = options.apply_options(globals())
types = ["single-subj", "cross-subj", "classification-task"] if result_type == "all" else [result_type]
if not set(types) <= {"single-subj", "cross-subj", "classification-task"}:
    raise utils.OptionsError(f"--result_type={result_type}: expected single-subj, cross-subj, classification-task "
                             "or all")
subject_list = utils.resolve_subjects(data_dir, subjects)
study = encoding_study.EncodingStudy(data_dir, out_dir, hemispheres, weights, image_size, split_seed, pca_components,
                                     seed, batch_size, alpha_mode, alphas, tuned_layer, checkpoint,
                                     options.resolve_device(device), layers, alpha_holdout, keep_search_features)
if {"single-subj", "cross-subj"} & set(types):
    for subject in subject_list:  # validate every subject (and the best-layer files) before writing anything
        study.subject(subject)
        for hemi in hemispheres:
            encoding_study.load_best_layers(out_dir, subject, hemi)
results = Path(results_dir)
roi_list = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)

if "single-subj" in types:
    all_rows = []
    for subject in subject_list:
        for hemi in hemispheres:
            rows, voxel_r, missing = results_utils.single_subject_rows(study, subject, hemi, roi_list,
                                                                       n_bootstrap, seed)
            for method, absent in missing.items():
                print(f"note: subj{subject:02d} {hemi}: no {method} model for {len(absent)} ROI(s) "
                      f"({', '.join(absent)}); their cells are left empty (NaN)")
            base = results / utils.subject_dir_name(subject) / f"single_subj_{hemi}"
            outputs.save_csv(base.with_suffix(".csv"), rows, config, **study.provenance())
            outputs.save_npz(base.with_name(base.name + "_voxel_r.npz"), voxel_r, config,
                             rows=["untuned", "reg", "cl"], metric="test Pearson r per voxel", **study.provenance())
            title = f"{utils.subject_dir_name(subject)} {hemi}"
            outputs.save_text(base.with_suffix(".md"), f"## {title}: median test Pearson r per ROI\n\n"
                              + outputs.markdown_table(rows, results_utils.SINGLE_SUBJ_COLUMNS), config)
            nonempty = [r for r in rows if r["n_voxels"]]
            outputs.save_figure(base.with_name(base.name + "_bars.png"), plots.plot_roi_bars(
                nonempty, ["untuned", "reg", "cl"], f"{title}: encoding accuracy per ROI"), config)
            outputs.save_figure(base.with_name(base.name + "_voxel_differences.png"),
                                plots.plot_voxel_differences(
                                    {roi: v[2] - v[0] for roi, v in voxel_r.items()},
                                    f"{title}: CL-tuned minus untuned, per voxel", "r(CL) - r(untuned)"), config)
            all_rows += rows
    summary = results_utils.group_table(all_rows)
    outputs.save_csv(results / "single_subj_summary.csv", summary, config, **study.provenance())
    outputs.save_text(results / "single_subj_summary.md",
                      "## Median test Pearson r, averaged over ROIs, subjects and hemispheres\n\n"
                      + outputs.markdown_table(summary), config)
    print(outputs.format_table(summary))

if "cross-subj" in types:
    cross_rois = utils.check_roi_names(cross_subj_rois)
    for hemi in hemispheres:
        for roi in cross_rois:
            for method in methods:
                median_r, improved = results_utils.cross_subject_matrices(study, subject_list, hemi, roi, method)
                base = results / "cross_subj" / f"{method}_{hemi}_{roi}"
                extra = {"rows": "source subject (backbone)", "columns": "target subject", "subjects": subject_list,
                         **study.provenance()}
                outputs.save_npy(base.with_name(base.name + "_median_r.npy"), median_r, config, **extra)
                outputs.save_npy(base.with_name(base.name + "_pct_improved.npy"), improved, config, **extra)
                outputs.save_figure(base.with_name(base.name + "_median_r.png"), plots.plot_transfer_matrix(
                    median_r, subject_list, f"{method.upper()}-tuned {roi} {hemi}: median test r",
                    "median Pearson r (test split)"), config)
                outputs.save_figure(base.with_name(base.name + "_pct_improved.png"), plots.plot_transfer_matrix(
                    improved, subject_list, f"{method.upper()}-tuned {roi} {hemi}: voxels beating untuned",
                    "% of target voxels improved"), config)
                print(f"cross-subj {method} {hemi} {roi}: mean off-diagonal median r "
                      f"{results_utils.off_diagonal_mean(median_r):.3f}, diagonal {np.nanmean(np.diag(median_r)):.3f}")

if "classification-task" in types:
    root = Path(classification_root) if classification_root else Path(data_dir) / "imagefolder"
    images, labels, classes = probes.load_classification_images(
        classification_dataset, root, image_size, classification_max_per_class, seed)
    backbones = [("untuned", 0, "", "", f"untuned:{weights}")]
    for subject in utils.resolve_subjects(data_dir, classification_subjects):
        for hemi in hemispheres:
            for roi in utils.check_roi_names(classification_rois):
                for method in methods:
                    ckpt = models.checkpoint_path(out_dir, method, subject, hemi, roi, checkpoint)
                    if ckpt.is_file():
                        backbones.append((method, subject, hemi, roi, str(ckpt)))
                    else:
                        print(f"note: no {method} model for subj{subject:02d} {hemi} {roi}: skipped in the probe")
    rows = []
    for method, subject, hemi, roi, spec in backbones:
        backbone = features.load_backbone(spec, study.device)
        feats = features.extract_features(backbone, images, np.arange(len(images)), [probe_layer],
                                          batch_size=batch_size, device=study.device,
                                          desc=f"probe features {method} {roi}")[probe_layer]
        rows.append({"method": method, "subject": subject, "hemisphere": hemi, "roi": roi,
                     "accuracy": probes.linear_probe_accuracy(feats, labels, probe_test_fraction, seed),
                     "chance": float(np.max(np.bincount(labels)) / len(labels)), "n_images": len(labels),
                     "n_classes": len(classes), "checkpoint": spec})
    name = f"classification_{classification_dataset}"
    outputs.save_csv(results / "classification" / f"{name}.csv", rows, config, classes=classes,
                     **study.provenance())
    outputs.save_figure(results / "classification" / f"{name}.png", plots.plot_probe_bars(
        rows, f"Linear probe on {classification_dataset} ({len(classes)} classes, {probe_layer})"), config)
    print(outputs.format_table(rows, ["method", "subject", "hemisphere", "roi", "accuracy"]))

print(f"results written to {results}")
