"""Predict the challenge's test images for every vertex: an Algonauts 2023 submission from this repo's features.

For each subject and hemisphere, every vertex chooses among candidate feature sets: the 8 untuned AlexNet
layers, plus each tuned backbone (CL, reg, pooled) whose ROI contains the vertex, read at the layer the results
stage chose for it (generate_results.py; searched here if it has not run). Each candidate is fitted on the train
split with one alpha per vertex (chosen on val, or by GCV), every vertex keeps the candidate and alpha with the
best val r, and with that choice fixed the model is refitted on train + val and predicts the test images.
Vertices in no ROI use untuned layers. Writes submission_dir/subjXX/{lh,rh}_pred_test.npy (float32, test images
x vertices, rows in test-image file order), a zip of the subjXX folders, and the val-based estimate of what was
submitted: per-vertex val r and choice, a per-ROI table (median and mean val r, challenge score where a noise
ceiling is given, the share of vertices choosing each kind of candidate) and a figure of those shares.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only; needs test_split/test_images)
out_dir = "out"                             # splits, caches, best layers and models from the earlier stages
submission_dir = "submission"               # where subjXX/{lh,rh}_pred_test.npy, the zip and the report go
subjects = []                               # [] = every subject in data_dir
hemispheres = ["lh", "rh"]                  # a submission needs both
features = "best"                           # best (untuned + every tuned set) | untuned | cl | reg | pooled-cl |
                                            # pooled-reg (untuned layers + that tuned set only)
tuned_sets = ["cl", "reg", "pooled-cl", "pooled-reg"]  # tuned sets considered by features=best; also
                                            # external:<name> (every layer of it a candidate for every vertex)
seeds = []                                  # tuned models' seeds (each a candidate); [] = every seed trained
backbone = "alexnet"                        # the network (as in the earlier stages: alexnet, resnet50, timm:<name>)
layers = []                                 # untuned candidates (+ the searched layers); [] = the backbone's default
weights = "DEFAULT"                         # untuned network weights (as in get_best_alex_layer.py)
features_dir = ""                           # external sets: features_dir/subjXX/<name>/{train,challenge}_<layer>.npy
checkpoint = "best"                         # best | last checkpoint of each tuned model
tuned_layer = "best"                        # as generate_results.py: best | untuned | a layer name
pooled_h_method = "constant"                # which pooled CL models (as generate_results.py)
layer_statistic = "median"                  # as get_best_alex_layer.py (part of each search's key)
search_missing = False                      # search a missing layer search here (else one line naming the command)
image_size = 224                            # pixels fed to the network (as in every stage)
pca_components = 1000                       # PCA size for wide layers (fitted on train only)
alphas = []                                 # ridge alpha grid; [] = encoding.ALPHAS
feature_scaling = "auto"                    # as get_best_alex_layer.py
alpha_selection = "val"                     # val (each vertex's alpha and candidate by val r) | gcv (alpha by
                                            # generalized cross-validation on train; candidate by val r)
noise_ceiling_dir = ""                      # for the challenge-score estimate; "" = the data's own, if any
make_zip = True                             # also write submission_dir/submission.zip
split_seed = 0                              # seed of the train/val/test split (read back from out_dir)
seed = 0                                    # PCA seed
batch_size = 128                            # images per forward pass
device = "auto"                             # auto (cuda if present), cpu, cuda, ...
# ---------------------------------------------------------------------
import options

config = options.apply_options(globals())

import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import encoding  # noqa: E402
import feature_sets as sets  # noqa: E402
import outputs  # noqa: E402
import paths  # noqa: E402
import plots  # noqa: E402
import search  # noqa: E402
import study as encoding_study  # noqa: E402
import utils  # noqa: E402

if features not in ("best", "untuned") + sets.TUNED:
    raise options.OptionsError(f"--features={features}: expected best, untuned, " + ", ".join(sets.TUNED))
if alpha_selection not in ("val", "gcv"):
    raise options.OptionsError(f"--alpha_selection={alpha_selection}: expected val or gcv")
candidate_sets = sets.check(tuned_sets) if features == "best" else [] if features == "untuned" else [features]
settings = encoding_study.StudySettings.from_options(config, alpha_mode="per-voxel")
study = encoding_study.EncodingStudy(settings)
torch_device = study.device
layers, alpha_grid = list(settings.layers), list(settings.alphas)
subject_list = utils.resolve_subjects(data_dir, subjects)
# validate every subject (test images, layer searches) before writing anything
challenge = {}
for subject in subject_list:
    d = study.subject(subject)
    challenge[subject] = utils.load_challenge_images(d.paths, out_dir, image_size)
    if challenge[subject] is None:
        raise options.DataError(f"{d.paths.train_images.parent.parent}: no test_split/test_images found for "
                                f"subject {subject}; the submission needs the challenge's test images")
encoding_study.check_searches(study, candidate_sets, subject_list, settings.hemispheres, utils.ROI_NAMES)


def candidate_features(subject: int, spec: str, layer: str) -> dict:
    """{'train', 'val', 'challenge'} features of one layer of one backbone, unit-scaled on train."""
    feats = study.features(subject, spec, [layer], challenge_images=challenge[subject])[layer]
    return search.scaled({name: feats[name] for name in ("train", "val", "challenge")}, settings.feature_scaling,
                         len(alpha_grid))


def fit_candidate(x: dict, y_train, y_val, compute_coef: bool):
    """Ridge on train with one alpha per vertex by alpha_selection; its val r per vertex at that alpha."""
    if alpha_selection == "gcv":
        fit = encoding.fit_ridge(x["train"], y_train, alphas=alpha_grid, selection="gcv", device=torch_device)
        return fit, encoding.pearson_r(y_val, fit.predict(x["val"]))
    fit = encoding.fit_ridge(x["train"], y_train, x["val"], y_val, alphas=alpha_grid, compute_coef=compute_coef,
                             device=torch_device)
    return fit, fit.best_val_scores_


summary_rows, predictions, choices = [], {}, {}
for subject in subject_list:
    d = study.subject(subject)
    s2 = paths.subject_dir_name(subject)
    n_test_images = len(challenge[subject])
    for hemi in settings.hemispheres:
        fmri = np.asarray(d.fmri[hemi])
        y_train, y_val = fmri[d.split["train"]], fmri[d.split["val"]]
        n_vertices = fmri.shape[1]
        # 1) every candidate's val r per vertex (NaN where the candidate does not apply)
        candidates = [("untuned", None, layer, settings.untuned_spec(), np.arange(n_vertices)) for layer in layers]
        for feature_set in candidate_sets:
            if sets.is_external(feature_set):  # like the untuned layers: each of its layers, every vertex
                candidates += [(feature_set, None, layer, feature_set, np.arange(n_vertices))
                               for layer in study.layers_of(feature_set, subject)]
                continue
            for roi, idx in d.roi_voxel_indices[hemi].items():
                for _, run_dir in study.run_dirs(feature_set, subject, hemi, roi) if len(idx) else []:
                    layer = study.layer_of(feature_set, subject, hemi, roi, run_dir)
                    candidates.append((feature_set, roi, layer, str(study.checkpoint(run_dir)), idx))
        scores = np.full((len(candidates), n_vertices), -np.inf)
        alpha_of = np.zeros((len(candidates), n_vertices))
        for k, (feature_set, roi, layer, spec, idx) in enumerate(tqdm(candidates, desc=f"{s2} {hemi} candidates",
                                                                      unit="candidate")):
            fit, val_r = fit_candidate(candidate_features(subject, spec, layer), y_train[:, idx], y_val[:, idx],
                                       compute_coef=False)
            scores[k, idx] = np.nan_to_num(val_r, nan=-np.inf)
            alpha_of[k, idx] = fit.alphas_
        choice = scores.argmax(0)  # ties (and all-NaN vertices) go to the first candidate: an untuned layer
        chosen_val_r = scores[choice, np.arange(n_vertices)]
        chosen_val_r[~np.isfinite(chosen_val_r)] = np.nan
        # 2) with the choice fixed, refit each chosen candidate on train + val and predict the test images
        prediction = np.empty((n_test_images, n_vertices), dtype=np.float32)
        for k in tqdm(np.unique(choice), desc=f"{s2} {hemi} refit on train+val", unit="candidate"):
            vertices = np.flatnonzero(choice == k)
            feature_set, roi, layer, spec, _ = candidates[k]
            x = candidate_features(subject, spec, layer)
            fit = encoding.fit_ridge(np.concatenate([x["train"], x["val"]]),
                                     np.concatenate([y_train[:, vertices], y_val[:, vertices]]),
                                     voxel_alphas=alpha_of[k, vertices], device=torch_device)
            prediction[:, vertices] = fit.predict(x["challenge"])
        if not np.isfinite(prediction).all():
            raise options.DataError(f"{s2} {hemi}: non-finite predictions; nothing written")
        expected = (n_test_images, d.n_vertices[hemi])
        if prediction.shape != expected:
            raise options.DataError(f"{s2} {hemi}: predictions of shape {prediction.shape}, expected {expected}")
        kinds = np.array([c[0] if c[0] != "untuned" else f"untuned {c[2]}" for c in candidates])
        predictions[(s2, hemi)] = prediction
        choices[(s2, hemi)] = {"val_r": chosen_val_r, "kind": kinds[choice],
                               "alpha": alpha_of[choice, np.arange(n_vertices)],
                               "layer": np.array([candidates[k][2] for k in choice]),
                               "roi": np.array([candidates[k][1] or "" for k in choice])}
        # 3) the val-based estimate of what was submitted, overall and per ROI
        ceiling = d.noise_ceiling.get(hemi)
        groups = {"all vertices": np.arange(n_vertices), **{roi: idx for roi, idx in d.roi_voxel_indices[hemi].items()
                                                            if len(idx)}}
        for name, idx in groups.items():
            row = {"subject": subject, "hemisphere": hemi, "vertices": name, "n_vertices": len(idx),
                   "median_val_r": float(np.nanmedian(chosen_val_r[idx])),
                   "mean_val_r": float(np.nanmean(chosen_val_r[idx]))}
            if ceiling is not None:
                row["mean_challenge_score_val"] = float(np.nanmean(encoding.challenge_score(chosen_val_r[idx],
                                                                                           ceiling[idx])))
            for kind in ["untuned"] + candidate_sets:
                chosen_kinds = kinds[choice[idx]]
                row[f"pct_{kind}"] = float(100 * np.mean([k.startswith(kind) for k in chosen_kinds]))
            summary_rows.append(row)
        print(f"{s2} {hemi}: median val r {np.nanmedian(chosen_val_r):.3f} over {n_vertices} vertices; "
              f"tuned candidates chosen by {np.mean([not k.startswith('untuned') for k in kinds[choice]]):.1%}")

# write only once every subject and hemisphere has valid predictions
for (s2, hemi), prediction in predictions.items():
    outputs.save_npy(Path(submission_dir) / s2 / f"{hemi}_pred_test.npy", prediction, config,
                     rows="challenge test images in file order", columns="challenge-space vertices")
    outputs.save_npz(Path(submission_dir) / "report" / s2 / f"{hemi}_choice.npz", choices[(s2, hemi)], config)
report = Path(submission_dir) / "report"
outputs.save_csv(report / "val_estimate.csv", summary_rows, config)
outputs.save_text(report / "val_estimate.md", "## Val-split estimate of the submitted predictions\n\n"
                  + outputs.markdown_table(summary_rows), config)
outputs.save_figure(report / "candidate_shares.png", plots.plot_candidate_shares(summary_rows, ["untuned"]
                                                                                 + candidate_sets), config)
if make_zip:
    def write_zip(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(submission_dir).glob("subj*/*_pred_test.npy")):
                archive.write(path, path.relative_to(submission_dir).as_posix())
    outputs.atomic_write(Path(submission_dir) / "submission.zip", write_zip, suffix=".tmp.zip")
print(outputs.format_table([r for r in summary_rows if r["vertices"] == "all vertices"]))
print(f"submission written to {submission_dir}")
