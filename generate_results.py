"""The paper's results: untuned vs reg-tuned vs CL-tuned (and pooled) AlexNet features, compared fairly.

Every feature set gets the same treatment (layer search, PCA, alpha selection, statistics; see study.py).
--result_type=single-subj          per ROI: layer, mean and median test r, challenge score, % voxels improved,
                                   bootstrap CIs and permutation p over test images (FDR across ROIs), CL retrieval;
                                   per-vertex arrays and cortical maps per subject; group table, across-subject
                                   tests (subjects as the unit, >= 3 subjects) and the study's figures
--result_type=cross-subj           each subject's tuned backbone used for every other subject (N x N matrices) and
                                   pooled backbones trained without the encoded subject (leave-one-subject-out)
--result_type=classification-task  linear probes of the backbones on an image-classification dataset
--result_type=all                  all three
Tables (.csv wide, *_tidy.csv one row per statistic, .npy/.npz, .md) and figures (.png) go to results_dir; each
folder's meta/ holds a JSON sidecar per file (options, checkpoints, package versions). Memory stays flat over a
study: each subject's outputs are written and dropped; the group figures keep compact per-voxel r and alphas.
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
map_sets = ["untuned", "cl"]                # sets drawn on the cortex per subject (test r, chosen layer, challenge
                                            # score where a noise ceiling is known); [] = no cortical maps
map_comparisons = ["cl:untuned", "cl:reg"]  # set:baseline differences of test r drawn on the cortex
fsaverage_dir = ""                          # FreeSurfer's fsaverage (surf/{lh,rh}.inflated) for the maps; "" =
                                            # nilearn's bundled fsaverage5 (fsaverage's first 10,242 vertices)
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import cortical_maps  # noqa: E402
import feature_sets as sets  # noqa: E402
import features  # noqa: E402
import outputs  # noqa: E402
import paths  # noqa: E402
import plots  # noqa: E402
import plots_study  # noqa: E402
import probes  # noqa: E402
import results_maps  # noqa: E402
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
map_pairs = []  # maps of sets or pairs not among --feature_sets are skipped with a note (the defaults name cl and reg)
for text in map_comparisons:
    try:
        map_pairs += results_utils.parse_comparisons([text], set_names)
    except options.OptionsError:
        print(f"note: --map_comparisons {text}: a set is not among --feature_sets; that map is skipped")
map_set_names = [s for s in sets.check(map_sets) if s in set_names]
for name in sorted(set(sets.check(map_sets)) - set(map_set_names)):
    print(f"note: --map_sets {name}: not among --feature_sets; its maps are skipped")
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


def fsaverage_masks(d: utils.Subject):
    """{hemi: the subject's challenge vertices on fsaverage}, or None (one note) when the data has none."""
    found = {h: d.paths.fsaverage_mask_path(h) for h in settings.hemispheres}
    if not all(p.is_file() for p in found.values()):
        print(f"note: {paths.subject_dir_name(d.subject)}: no {utils.FSAVERAGE_MASK} in {d.paths.roi_dir}; "
              "its cortical maps are skipped (the per-vertex arrays are saved)")
        return None
    return {h: utils.load_fsaverage_mask(p, d.n_vertices[h]) for h, p in found.items()}


def training_logs() -> dict:
    """{tuned set: [rows of each model's log.csv]} for every trained model of the backbone (pooled CL: of
    pooled_h_method; leave-one-subject-out models among the pooled)."""
    root = Path(out_dir) / "models" / paths.backbone_dir_name(backbone)
    logs = {}
    for name in (s for s in set_names if sets.is_tuned(s)):
        folder = root / paths.method_dir_name(sets.method_of(name), sets.is_pooled(name), pooled_h_method)
        logs[name] = [plots_study.read_training_log(p) for p in sorted(folder.glob("**/log.csv"))]
    return {name: runs for name, runs in logs.items() if runs}


# ---- single subject: per ROI, every feature set and comparison; per vertex; the study's figures ----
if "single-subj" in result_types:
    all_rows, group_voxel_r, group_alphas, surfaces = [], [], {}, None
    with outputs.csv_stream(results / "single_subj_tidy.csv", results_utils.TIDY_COLUMNS) as write_tidy:
        for subject in subject_list:
            d = study.subject(subject)
            folder = results / paths.subject_dir_name(subject)
            arrays = {}
            for hemi in settings.hemispheres:
                res = results_utils.single_subject_rows(study, subject, hemi, roi_list, set_names, pairs,
                                                        n_bootstrap, n_permutations, seed, retrieval_candidates)
                for feature_set, absent in res.missing.items():
                    listed = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
                    print(f"note: subj{subject:02d} {hemi}: no {feature_set} model for {len(absent)} ROI(s) "
                          f"({listed}); their cells are left empty")
                base = folder / f"single_subj_{hemi}"
                outputs.save_csv(base.with_suffix(".csv"), res.rows, config, **study.provenance())
                outputs.save_npz(base.with_name(base.name + "_voxel_r.npz"), res.voxel_r, config, rows=set_names,
                                 metric="test Pearson r per voxel", **study.provenance())
                title = f"{paths.subject_dir_name(subject)} {hemi}"
                outputs.save_text(base.with_suffix(".md"), f"## {title}: test-split encoding accuracy per ROI\n\n"
                                  + results_utils.markdown_report(res.rows, set_names, pairs), config)
                outputs.save_figure(base.with_name(base.name + "_accuracy.png"), plots.plot_roi_accuracy(
                    [r for r in res.rows if r["n_voxels"]], set_names, f"{title}: encoding accuracy per ROI"), config)
                write_tidy(results_utils.tidy_rows(res.rows, set_names, pairs))
                arrays[hemi] = results_maps.vertex_arrays(res.voxel_r, d.roi_voxel_indices[hemi], set_names,
                                                          res.layers, settings.layers, d.n_vertices[hemi],
                                                          d.noise_ceiling.get(hemi))
                outputs.save_npz(folder / f"{hemi}_vertex_r.npz", arrays[hemi], config,
                                 metric="test Pearson r per vertex (challenge space; NaN: not fitted)",
                                 overlap=results_maps.OVERLAP_RULE, **study.provenance())
                # what the group figures need, compact: per-voxel r in float16, each model's chosen alphas
                all_rows += res.rows
                group_voxel_r.append({roi: r.astype(np.float16) for roi, r in res.voxel_r.items()})
                for feature_set, alphas in res.alphas.items():
                    group_alphas.setdefault(feature_set, []).extend(alphas)
            fs_masks = fsaverage_masks(d) if map_set_names or map_pairs else None
            if fs_masks is not None:
                surfaces = surfaces or cortical_maps.load_surfaces(fsaverage_dir or None)
                masks = {h: results_maps.roi_masks(d.roi_voxel_indices[h], d.n_vertices[h]) for h in arrays}
                for name, fig in results_maps.subject_maps(arrays, fs_masks, masks, map_set_names, map_pairs, surfaces,
                                                           d.noise_ceiling):
                    outputs.save_figure(folder / "maps" / name, fig, config)
            del arrays
            study.release(subject)
    outputs.write_sidecar(results / "single_subj_tidy.csv", config, columns=results_utils.TIDY_COLUMNS,
                          **study.provenance())
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
    # the study's figures: subjects as dots and CIs, ROI x subject heatmaps, per-voxel hexbins, alphas, training
    measured = [r for r in all_rows if r["n_voxels"]]
    for hemi in settings.hemispheres:
        outputs.save_figure(results / f"accuracy_{hemi}.png", plots_study.plot_roi_accuracy_group(
            [r for r in measured if r["hemisphere"] == hemi], set_names,
            f"{hemi}: encoding accuracy per ROI across subjects"), config)
    for baseline in dict.fromkeys(b for _, b in pairs):
        compared = [baseline] + [a for a, b in pairs if b == baseline]
        outputs.save_figure(results / f"subject_pairs_vs_{baseline}.png", plots_study.plot_subject_pairs(
            measured, compared, baseline), config)
    outputs.save_figure(results / "difference_heatmaps.png", plots_study.plot_difference_heatmaps(measured, pairs),
                        config)
    for a, b in pairs:
        k_a, k_b = set_names.index(a), set_names.index(b)
        if any(np.isfinite(v[k_a]).any() and np.isfinite(v[k_b]).any() for m in group_voxel_r for v in m.values()):
            outputs.save_figure(results / f"voxel_hexbin_{a}_vs_{b}.png", plots_study.plot_voxel_hexbin(
                group_voxel_r, set_names, a, b), config)
    if any(k.startswith("top1_of_") for r in all_rows for k in r):
        outputs.save_figure(results / "retrieval.png", plots.plot_retrieval(all_rows, set_names), config)
    if settings.alpha_mode != "paper" and group_alphas:
        outputs.save_figure(results / "alpha_distribution.png", plots_study.plot_alpha_distribution(
            group_alphas, settings.alphas, f"Ridge alphas chosen on val per voxel ({settings.alpha_mode})"),
            config)
    logs = training_logs()
    if logs:
        outputs.save_figure(results / "training_curves.png", plots_study.plot_training_curves(
            logs, f"Training curves of every {backbone} model in {out_dir}"), config)
    del all_rows, group_voxel_r, group_alphas

# ---- cross subject: each backbone on every subject; pooled backbones without the encoded subject ----
if "cross-subj" in result_types:
    cross_rois = utils.check_roi_names(cross_subj_rois)
    keys = [(method, hemi, roi) for hemi in settings.hemispheres for roi in cross_rois for method in methods]
    matrices = {key: {name: np.full((len(subject_list),) * 2, np.nan) for name in ("median_r", "mean_r",
                                                                                   "pct_improved")} for key in keys}
    loso_rows = []
    for j, target in enumerate(subject_list):   # one encoded subject at a time, then its data is dropped
        for method, hemi, roi in keys:
            column = results_utils.cross_subject_column(study, target, subject_list, hemi, roi, method)
            for name, values in column.items():
                matrices[(method, hemi, roi)][name][:, j] = values
        for hemi in settings.hemispheres:
            for roi in cross_rois:
                loso_rows += results_utils.leave_one_subject_out_rows(study, [target], hemi, roi, set_names)
        study.release(target)
    folder = results / "cross_subj"
    transfer_tidy, overview = [], {"median_r": {}, "pct_improved": {}}
    for (method, hemi, roi), stats in matrices.items():
        base = folder / f"{method}_{hemi}_{roi}"
        extra = {"rows": "source subject (backbone)", "columns": "target subject", "subjects": subject_list,
                 **study.provenance()}
        for name, matrix in stats.items():
            outputs.save_npy(base.with_name(f"{base.name}_{name}.npy"), matrix, config, **extra)
        transfer_tidy += results_utils.tidy_matrix_rows(stats, subject_list, method=method, hemisphere=hemi, roi=roi)
        median_r, improved = stats["median_r"], stats["pct_improved"]
        if not np.isfinite(median_r).any():
            continue
        overview["median_r"][(method, hemi, roi)], overview["pct_improved"][(method, hemi, roi)] = median_r, improved
        outputs.save_figure(base.with_name(base.name + "_median_r.png"), plots.plot_transfer_matrix(
            median_r, subject_list, f"{method.upper()}-tuned {roi} {hemi}: median test r",
            "median Pearson r (test split)"), config)
        outputs.save_figure(base.with_name(base.name + "_pct_improved.png"), plots.plot_transfer_matrix(
            improved, subject_list, f"{method.upper()}-tuned {roi} {hemi}: voxels beating untuned",
            "% of target voxels improved", centre=50), config)
        print(f"cross-subj {method} {hemi} {roi}: mean off-diagonal median r "
              f"{results_utils.off_diagonal_mean(median_r):.3f}, diagonal {np.nanmean(np.diag(median_r)):.3f}")
    outputs.save_csv(folder / "transfer_tidy.csv", transfer_tidy, config, **study.provenance())
    for statistic, label in (("median_r", "median test r (Pearson)"),
                             ("pct_improved", "% of target voxels beating untuned")):
        if overview[statistic]:
            outputs.save_figure(folder / f"transfer_overview_{statistic}.png",
                                plots_study.plot_transfer_overview(overview[statistic], label), config)
    if loso_rows:
        loso_rows.sort(key=lambda r: (r["hemisphere"], utils.ROI_NAMES.index(r["roi"]), r["subject"]))
        outputs.save_csv(folder / "pooled_leave_one_subject_out.csv", loso_rows, config, **study.provenance())
        outputs.save_csv(folder / "pooled_leave_one_subject_out_tidy.csv", results_utils.tidy_loso_rows(loso_rows),
                         config, **study.provenance())
        outputs.save_text(folder / "pooled_leave_one_subject_out.md",
                          "## Pooled backbones on a subject they were not trained on (leave-one-subject-out)\n\n"
                          + outputs.markdown_table(loso_rows), config)
        outputs.save_figure(folder / "pooled_leave_one_subject_out.png", plots.plot_leave_one_subject_out(loso_rows),
                            config)

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
        del backbone
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
