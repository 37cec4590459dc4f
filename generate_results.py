"""The paper's results: untuned vs reg-tuned vs CL-tuned (and pooled) AlexNet features, compared fairly.

Every feature set gets the same treatment (layer search, PCA, alpha selection, statistics; see study.py).
--result_type=single-subj          per ROI: layer, mean and median test r, challenge score, % voxels improved,
                                   bootstrap CIs and permutation p over test images (FDR across ROIs), CL retrieval;
                                   group table and across-subject tests (subjects as the unit, >= 3 subjects)
--result_type=cross-subj           each subject's tuned backbone used for every other subject (N x N matrices) and
                                   pooled backbones trained without the encoded subject (leave-one-subject-out)
--result_type=classification-task  linear probes of the backbones on an image-classification dataset
--result_type=all                  all three
Tables (.csv/.npy/.md) and figures (.png) go to results_dir, each with a .meta.json sidecar.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only)
out_dir = "out"                             # splits, caches, models and layer searches from earlier stages
results_dir = "Results"                     # where tables and figures are written
result_type = "all"                         # single-subj | cross-subj | classification-task | all
subjects = []                               # [] = every subject in data_dir
hemispheres = ["lh", "rh"]                  # hemispheres to evaluate
rois = []                                   # single-subj ROIs; [] = all 31 (empty ones reported)
feature_sets = ["untuned", "reg", "cl", "pooled-reg", "pooled-cl"]  # sets compared (missing models: empty
                                            # cells); also external:<name> (features_dir)
comparisons = ["cl:untuned", "cl:reg", "pooled-cl:untuned", "pooled-cl:cl", "pooled-reg:reg"]  # set:baseline
seeds = []                                  # tuned models' seeds averaged; [] = every seed trained
backbone = "alexnet"                        # the network whose untuned and tuned features are compared (as in
                                            # get_best_alex_layer.py: alexnet, resnet50, timm:<name>, ...)
weights = "DEFAULT"                         # untuned network weights (as in get_best_alex_layer.py)
checkpoint = "best"                         # best (val-selected) | last (final epoch; trained with keep_last)
pooled_h_method = "constant"                # which pooled CL models: constant (h = 5741) | average
features_dir = ""                           # external sets: features_dir/subjXX/<name>/{train,challenge}_<layer>.npy
cross_subj_rois = ["V1v", "FFA-1", "PPA", "EBA", "VWFA-1"]  # ROIs for the cross-subject matrices
methods = ["cl", "reg"]                     # per-subject tuned sets in the cross-subject matrices and probes
image_size = 224                            # pixels fed to the network (as in training)
tuned_layer = "best"                        # best: each set's own layer search | untuned: the ROI's best untuned
                                            # layer (2023 original) | a layer name for every tuned set
layers = []                                 # the searched layers (as get_best_alex_layer.py); [] = the backbone's
                                            # default (AlexNet: the paper's 8)
layer_statistic = "median"                  # as get_best_alex_layer.py (part of each search's key)
pca_components = 1000                       # PCA size for wide layers (fitted on train only)
alpha_mode = "per-voxel"                    # per-voxel | per-roi (one alpha per ROI and set) | untuned-per-roi
                                            # (the untuned one reused for every set, 2023 original) (all chosen on
                                            # val) | paper (fixed 1e3 untuned / 1e4 tuned)
fit_split = "train"                         # train | train+val: the test-split models refitted on train + val with
                                            # the alphas chosen on val (the original's 85 %; needs checkpoint=last)
alphas = []                                 # ridge alpha grid; [] = encoding.ALPHAS
feature_scaling = "auto"                    # auto (unit variance for an alpha grid, none for paper) | unit | none
search_missing = False                      # search a missing layer search here (else one line naming the command)
noise_ceiling_dir = ""                      # subjXX/{lh,rh}_noise_ceiling.npy (fractions or %); "" = the data's own
n_bootstrap = 1000                          # bootstrap resamples of test images for CIs
n_permutations = 1000                       # permutations (swaps over test images) for p-values
retrieval_candidates = 300                  # CL retrieval among this many test images (MindEye: 300)
min_subjects = 3                            # across-subject tests need this many subjects with both sets
split_seed = 0                              # seed of the train/val/test split (read back from out_dir)
seed = 0                                    # PCA, val halves, bootstrap, permutation and probe-split seed
batch_size = 128                            # images per forward pass
device = "auto"                             # auto (cuda if present) | cpu | cuda | ...
classification_dataset = "imagefolder"      # imagefolder | caltech256 | places365 | sun397 | imagenet
classification_root = ""                    # the dataset's folder (needed by classification-task)
classification_max_per_class = 0            # images per class used for the probe (0 = all, as the original)
classification_subjects = []                # backbones' subjects for the probe; [] = all
classification_rois = ["FFA-1", "PPA", "EBA", "VWFA-1", "V1v"]  # backbones' ROIs for the probe
probe_layer = ""                            # layer the linear probe reads; "" = AlexNet's classifier.5 (fc7, the
                                            # original's), other backbones' embedding node
probe_test_fraction = 0.15                  # held-out fraction of the probe's seeded split (original: 85/15)
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import feature_sets as sets  # noqa: E402
import features  # noqa: E402
import outputs  # noqa: E402
import paths  # noqa: E402
import plots  # noqa: E402
import probes  # noqa: E402
import results_utils  # noqa: E402
import study as encoding_study  # noqa: E402
import utils  # noqa: E402

result_types = ["single-subj", "cross-subj", "classification-task"] if result_type == "all" else [result_type]
if not set(result_types) <= {"single-subj", "cross-subj", "classification-task"}:
    raise options.OptionsError(f"--result_type={result_type}: expected single-subj, cross-subj, "
                               "classification-task or all")
set_names = sets.check(feature_sets)
if "untuned" not in set_names:
    raise options.OptionsError(f"--feature_sets={feature_sets}: the untuned set is every comparison's baseline")
if any(sets.is_external(s) for s in set_names) and not features_dir:
    raise options.OptionsError("--feature_sets names external sets: give --features_dir")
if "classification-task" in result_types and not classification_root:
    raise options.OptionsError("--result_type includes classification-task: give --classification_root (the "
                               f"{classification_dataset} folder)")
pairs = results_utils.parse_comparisons(comparisons, set_names)
subject_list = utils.resolve_subjects(data_dir, subjects)
settings = encoding_study.StudySettings.from_options(config)
study = encoding_study.EncodingStudy(settings)
roi_list = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)
if {"single-subj", "cross-subj"} & set(result_types):
    # validate every subject and read every layer search the tables need before writing anything
    for subject in subject_list:
        study.subject(subject)
    needed_rois = sorted(set(roi_list) | set(utils.check_roi_names(cross_subj_rois)), key=utils.ROI_NAMES.index)
    encoding_study.check_searches(study, set_names, subject_list, settings.hemispheres, needed_rois)
results = Path(results_dir)
roi_list = utils.check_roi_names(rois) if rois else list(utils.ROI_NAMES)

# ---- single subject: per ROI, every feature set and comparison ----
if "single-subj" in result_types:
    all_rows = []
    for subject in subject_list:
        for hemi in settings.hemispheres:
            rows, voxel_r, missing = results_utils.single_subject_rows(
                study, subject, hemi, roi_list, set_names, pairs, n_bootstrap, n_permutations, seed,
                retrieval_candidates)
            for feature_set, absent in missing.items():
                print(f"note: subj{subject:02d} {hemi}: no {feature_set} model for {len(absent)} ROI(s) "
                      f"({', '.join(absent)}); their cells are left empty")
            base = results / paths.subject_dir_name(subject) / f"single_subj_{hemi}"
            outputs.save_csv(base.with_suffix(".csv"), rows, config, **study.provenance())
            outputs.save_npz(base.with_name(base.name + "_voxel_r.npz"), voxel_r, config, rows=set_names,
                             metric="test Pearson r per voxel", **study.provenance())
            title = f"{paths.subject_dir_name(subject)} {hemi}"
            outputs.save_text(base.with_suffix(".md"), f"## {title}: test-split encoding accuracy per ROI\n\n"
                              + results_utils.markdown_report(rows, set_names, pairs), config)
            nonempty = [r for r in rows if r["n_voxels"]]
            outputs.save_figure(base.with_name(base.name + "_bars.png"), plots.plot_roi_bars(
                nonempty, set_names, f"{title}: encoding accuracy per ROI (bars: median, dots: mean)"), config)
            for a, b in pairs:
                k_a, k_b = set_names.index(a), set_names.index(b)
                differences = {roi: v[k_a] - v[k_b] for roi, v in voxel_r.items() if np.isfinite(v[k_a]).any()
                               and np.isfinite(v[k_b]).any()}
                if differences:
                    outputs.save_figure(base.with_name(f"{base.name}_{a}_vs_{b}_voxel_differences.png"),
                                        plots.plot_voxel_differences(
                                            differences, f"{title}: {a} minus {b}, per voxel",
                                            f"r({a}) - r({b})"), config)
            all_rows += rows
    if any(k.startswith("top1_of_") for r in all_rows for k in r):
        outputs.save_figure(results / "retrieval.png", plots.plot_retrieval(all_rows, set_names), config)
    summary = results_utils.group_table(all_rows, set_names, pairs)
    across = results_utils.across_subject_table(all_rows, set_names, pairs, min_subjects)
    outputs.save_csv(results / "single_subj_summary.csv", summary, config, **study.provenance())
    outputs.save_csv(results / "across_subjects.csv", across, config, unit="subject",
                     tests="paired t (scipy ttest_rel) and Wilcoxon signed-rank over subjects' ROI median r")
    n_subjects = max((t["n_subjects"] for t in across), default=0)
    note = ("" if n_subjects >= min_subjects else
            f"\n(only {n_subjects} subject(s) have both sets of a comparison: the across-subject tests need "
            f"{min_subjects}, so their p-values are empty)\n")
    outputs.save_text(results / "single_subj_summary.md",
                      "## Test-split r averaged over ROIs, subjects and hemispheres (ROIs where every set has a "
                      "score)\n\n" + outputs.markdown_table(summary)
                      + "\n## Across subjects: paired tests over subjects' ROI median r\n" + note + "\n"
                      + outputs.markdown_table(across, ["hemisphere", "roi", "method_a", "method_b", "n_subjects",
                                                        "mean_diff", "t", "p_t", "p_t_fdr", "W", "p_w", "p_w_fdr"]),
                      config)
    print(outputs.format_table(summary))

# ---- cross subject: each backbone on every subject; pooled backbones without the encoded subject ----
if "cross-subj" in result_types:
    cross_rois = utils.check_roi_names(cross_subj_rois)
    loso_rows = []
    for hemi in settings.hemispheres:
        for roi in cross_rois:
            for method in methods:
                median_r, mean_r, improved = results_utils.cross_subject_matrices(study, subject_list, hemi, roi,
                                                                                  method)
                base = results / "cross_subj" / f"{method}_{hemi}_{roi}"
                extra = {"rows": "source subject (backbone)", "columns": "target subject", "subjects": subject_list,
                         **study.provenance()}
                for name, matrix in (("median_r", median_r), ("mean_r", mean_r), ("pct_improved", improved)):
                    outputs.save_npy(base.with_name(f"{base.name}_{name}.npy"), matrix, config, **extra)
                outputs.save_figure(base.with_name(base.name + "_median_r.png"), plots.plot_transfer_matrix(
                    median_r, subject_list, f"{method.upper()}-tuned {roi} {hemi}: median test r",
                    "median Pearson r (test split)"), config)
                outputs.save_figure(base.with_name(base.name + "_pct_improved.png"), plots.plot_transfer_matrix(
                    improved, subject_list, f"{method.upper()}-tuned {roi} {hemi}: voxels beating untuned",
                    "% of target voxels improved"), config)
                print(f"cross-subj {method} {hemi} {roi}: mean off-diagonal median r "
                      f"{results_utils.off_diagonal_mean(median_r):.3f}, diagonal {np.nanmean(np.diag(median_r)):.3f}")
            loso_rows += results_utils.leave_one_subject_out_rows(study, subject_list, hemi, roi, set_names)
    if loso_rows:
        outputs.save_csv(results / "cross_subj" / "pooled_leave_one_subject_out.csv", loso_rows, config,
                         **study.provenance())
        outputs.save_text(results / "cross_subj" / "pooled_leave_one_subject_out.md",
                          "## Pooled backbones on a subject they were not trained on (leave-one-subject-out)\n\n"
                          + outputs.markdown_table(loso_rows), config)
        outputs.save_figure(results / "cross_subj" / "pooled_leave_one_subject_out.png",
                            plots.plot_leave_one_subject_out(loso_rows), config)

# ---- classification: linear probes of every backbone on one dataset ----
if "classification-task" in result_types:
    images, labels, classes = probes.probe_image_cache(classification_dataset, classification_root, out_dir,
                                                       classification_max_per_class, seed,
                                                       **probes.probe_input(settings.backbone, settings.weights))
    probe_layer = probe_layer or probes.probe_layer(settings.backbone)
    backbones = [("untuned", 0, "", "", None, settings.untuned_spec())]
    for hemi in settings.hemispheres:
        for roi in utils.check_roi_names(classification_rois):
            for subject in utils.resolve_subjects(data_dir, classification_subjects):
                for method in methods:
                    runs = study.run_dirs(method, subject, hemi, roi)
                    backbones += [(method, subject, hemi, roi, s, str(study.checkpoint(d))) for s, d in runs]
                    if not runs:
                        print(f"note: no {method} model for subj{subject:02d} {hemi} {roi}: skipped in the probe")
            for pooled in (s for s in set_names if sets.is_pooled(s)):
                backbones += [(pooled, 0, hemi, roi, s, str(study.checkpoint(d)))
                              for s, d in study.run_dirs(pooled, 0, hemi, roi)]
    rows = []
    for method, subject, hemi, roi, model_seed, spec in backbones:  # one forward pass per backbone
        backbone = features.load_backbone(spec, study.device, settings.backbone)
        feats = features.extract_features(backbone, images, None, [probe_layer], batch_size=batch_size,
                                          device=study.device, desc=f"probe features {method} {hemi} {roi}")
        rows.append({"method": method, "subject": subject, "hemisphere": hemi, "roi": roi, "seed": model_seed,
                     "accuracy": probes.linear_probe_accuracy(feats[probe_layer], labels, probe_test_fraction, seed),
                     "chance": float(np.max(np.bincount(labels)) / len(labels)), "n_images": len(labels),
                     "n_classes": len(classes), "layer": probe_layer, "checkpoint": spec})
    name = f"classification_{classification_dataset}"
    outputs.save_csv(results / "classification" / f"{name}.csv", rows, config, classes=classes,
                     **study.provenance())
    outputs.save_figure(results / "classification" / f"{name}.png", plots.plot_probe_bars(
        rows, f"Linear probe on {classification_dataset} ({len(classes)} classes, {probe_layer})"), config)
    print(outputs.format_table(rows, ["method", "subject", "hemisphere", "roi", "accuracy"]))

print(f"results written to {results}")
