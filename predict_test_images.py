"""Predict the challenge's test images for every vertex: an Algonauts 2023 submission from this repo's features.

For each subject and hemisphere, every vertex chooses among candidate feature sets: the 8 untuned AlexNet
layers, plus each tuned backbone (CL, reg, pooled) whose ROI contains the vertex, read at the layer its layer search
chose. Each candidate is fitted on the train split with one alpha per vertex (chosen on val, or by GCV), and every
vertex keeps the candidate and alpha with the best val r. With that choice fixed, the model is refitted on
`refit` (all: train + val + the internal test split; train+val) and predicts the test images.
Vertices in no ROI use untuned layers. Writes submission_dir/subjXX/{lh,rh}_pred_test.npy (float32, test images
x vertices, rows in test-image file order; nothing else, so a zip of the subjXX folders holds predictions only),
submission.zip, and report/: the submission's manifest and options (submission.json), per-vertex choices and
scores, and estimates per ROI: the val r of the choice (optimistic: the maximum over candidates and alphas on the
split that chose them) beside the out-of-sample estimate (the choice fitted on train alone, scored on the internal
test split), with the challenge score where a noise ceiling is known, and a figure of the candidate shares.
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
refit = "all"                               # rows of the final fit, the choice made before on val: all (train +
                                            # val + internal test split) | train+val
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

CHALLENGE_SUBJECTS = range(1, 9)  # Algonauts 2023: subj01..subj08, both hemispheres
REFITS = {"all": ("train", "val", "test"), "train+val": ("train", "val")}

if features not in ("best", "untuned") + sets.TUNED:
    raise options.OptionsError(f"--features={features}: expected best, untuned, " + ", ".join(sets.TUNED))
if alpha_selection not in ("val", "gcv"):
    raise options.OptionsError(f"--alpha_selection={alpha_selection}: expected val or gcv")
if refit not in REFITS:
    raise options.OptionsError(f"--refit={refit}: expected " + " or ".join(REFITS))
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
    """{'train', 'val', 'test', 'challenge'} features of one layer of one backbone, unit-scaled on train."""
    feats = study.features(subject, spec, [layer], challenge_images=challenge[subject])[layer]
    return search.scaled({name: feats[name] for name in ("train", "val", "test", "challenge")},
                         settings.feature_scaling, len(alpha_grid))


def fit_candidate(x: dict, y_train, y_val, compute_coef: bool):
    """Ridge on train with one alpha per vertex by alpha_selection; its val r per vertex at that alpha."""
    if alpha_selection == "gcv":
        fit = encoding.fit_ridge(x["train"], y_train, alphas=alpha_grid, selection="gcv", device=torch_device)
        return fit, encoding.pearson_r(y_val, fit.predict(x["val"]))
    fit = encoding.fit_ridge(x["train"], y_train, x["val"], y_val, alphas=alpha_grid, compute_coef=compute_coef,
                             device=torch_device)
    return fit, fit.best_val_scores_


def summary_row(subject, hemi, name, idx, val_r, test_r, ceiling, chosen_kinds) -> dict:
    """One line of the estimate: the optimistic val r of the choice beside its out-of-sample internal-test r."""
    row = {"subject": subject, "hemisphere": hemi, "vertices": name, "n_vertices": len(idx),
           "median_val_r_optimistic": float(np.nanmedian(val_r[idx])),
           "mean_val_r_optimistic": float(np.nanmean(val_r[idx])),
           "median_test_r": float(np.nanmedian(test_r[idx])), "mean_test_r": float(np.nanmean(test_r[idx]))}
    if ceiling is not None:
        for split_name, r in (("val_optimistic", val_r), ("test", test_r)):
            # the challenge's statistic: the mean over vertices
            row[f"mean_challenge_score_{split_name}"] = float(np.nanmean(encoding.challenge_score(r[idx],
                                                                                               ceiling[idx])))
    for kind in ["untuned"] + candidate_sets:
        row[f"pct_{kind}"] = float(100 * np.mean([k.startswith(kind) for k in chosen_kinds[idx]]))
    return row


def missing_parts(folder: Path) -> list[str]:
    """Warning lines: one naming the challenge subjects without predictions, one per hemisphere a present subject
    lacks."""
    present = {(s, h) for s in CHALLENGE_SUBJECTS for h in utils.HEMISPHERES
               if (folder / paths.subject_dir_name(s) / f"{h}_pred_test.npy").is_file()}
    absent = [paths.subject_dir_name(s) for s in CHALLENGE_SUBJECTS if not {(s, h) for h in utils.HEMISPHERES}
              & present]
    lines = [f"warning: {folder}: no predictions for {', '.join(absent)}; the challenge scores subj01..subj08"] \
        if absent else []
    for s in CHALLENGE_SUBJECTS:
        for h in utils.HEMISPHERES:
            if (s, h) not in present and paths.subject_dir_name(s) not in absent:
                lines.append(f"warning: {folder}: {paths.subject_dir_name(s)} has no {h}_pred_test.npy; the "
                             "challenge scores both hemispheres")
    return lines


summary_rows, predictions, choices = [], {}, {}
for subject in subject_list:
    d = study.subject(subject)
    s2 = paths.subject_dir_name(subject)
    n_test_images = len(challenge[subject])
    for hemi in settings.hemispheres:
        fmri = np.asarray(d.fmri[hemi])
        y_train, y_val, y_test = (fmri[d.split[name]] for name in ("train", "val", "test"))
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
        # 2) with the choice fixed: fitted on train alone and scored on the internal test split (the out-of-sample
        # estimate), then refitted on the refit rows to predict the challenge's test images
        prediction = np.empty((n_test_images, n_vertices), dtype=np.float32)
        test_prediction = np.empty((len(y_test), n_vertices), dtype=np.float32)
        y_refit = fmri[np.concatenate([d.split[name] for name in REFITS[refit]])]
        for k in tqdm(np.unique(choice), desc=f"{s2} {hemi} fit on train, refit on {refit}", unit="candidate"):
            vertices = np.flatnonzero(choice == k)
            feature_set, roi, layer, spec, _ = candidates[k]
            x = candidate_features(subject, spec, layer)
            on_train = encoding.fit_ridge(x["train"], y_train[:, vertices], voxel_alphas=alpha_of[k, vertices],
                                          device=torch_device)
            test_prediction[:, vertices] = on_train.predict(x["test"])
            x_rows = np.concatenate([x[name] for name in REFITS[refit]])
            final = encoding.fit_ridge(x_rows, y_refit[:, vertices], voxel_alphas=alpha_of[k, vertices],
                                       device=torch_device)
            prediction[:, vertices] = final.predict(x["challenge"])
        chosen_test_r = encoding.pearson_r(y_test, test_prediction)
        if not np.isfinite(prediction).all():
            raise options.DataError(f"{s2} {hemi}: non-finite predictions; nothing written")
        expected = (n_test_images, d.n_vertices[hemi])
        if prediction.shape != expected:
            raise options.DataError(f"{s2} {hemi}: predictions of shape {prediction.shape}, expected {expected}")
        kinds = np.array([c[0] if c[0] != "untuned" else f"untuned {c[2]}" for c in candidates])
        predictions[(s2, hemi)] = prediction
        choices[(s2, hemi)] = {"val_r": chosen_val_r, "test_r": chosen_test_r, "kind": kinds[choice],
                               "alpha": alpha_of[choice, np.arange(n_vertices)],
                               "layer": np.array([candidates[k][2] for k in choice]),
                               "roi": np.array([candidates[k][1] or "" for k in choice])}
        # 3) the estimates of what was submitted, overall and per ROI
        groups = {"all vertices": np.arange(n_vertices), **{roi: idx for roi, idx in d.roi_voxel_indices[hemi].items()
                                                            if len(idx)}}
        summary_rows += [summary_row(subject, hemi, name, idx, chosen_val_r, chosen_test_r, d.noise_ceiling.get(hemi),
                                     kinds[choice]) for name, idx in groups.items()]
        print(f"{s2} {hemi}: median r over {n_vertices} vertices: {np.nanmedian(chosen_test_r):.3f} on the internal "
              f"test split (out of sample), {np.nanmedian(chosen_val_r):.3f} on val (optimistic); tuned candidates "
              f"chosen by {np.mean([not k.startswith('untuned') for k in kinds[choice]]):.1%}")

# write only once every subject and hemisphere has valid predictions; subjXX/ holds the predictions alone
submission = Path(submission_dir)
report = submission / "report"
for (s2, hemi), prediction in predictions.items():
    path = submission / s2 / f"{hemi}_pred_test.npy"
    outputs.save_npy(path, prediction)
    outputs.sidecar_path(path).unlink(missing_ok=True)  # a sidecar an earlier version wrote beside it
    outputs.save_npz(report / s2 / f"{hemi}_choice.npz", choices[(s2, hemi)])
outputs.save_json(report / "submission.json", {
    "files": {f"{s2}/{hemi}_pred_test.npy": {"shape": list(p.shape), "dtype": str(p.dtype)}
              for (s2, hemi), p in predictions.items()},
    "rows": "challenge test images in test-image file order", "columns": "challenge-space vertices",
    "refit": f"{refit}: " + " + ".join(REFITS[refit]) + " rows of the training images, each vertex's candidate "
             "and alpha chosen on val",
    "estimates": "report/estimate.csv: val r of the choice (optimistic) and r of the choice fitted on train, "
                 "scored on the internal test split (out of sample)",
    "choices": "report/subjXX/{lh,rh}_choice.npz: per vertex kind, layer, roi, alpha, val_r, test_r"},
    config, **study.provenance())
outputs.save_csv(report / "estimate.csv", summary_rows)
outputs.save_text(report / "estimate.md", (
    "## Estimates of the submitted predictions\n\n"
    f"Each vertex's candidate and alpha were chosen on the val split; the submission was refitted on {refit} "
    f"({' + '.join(REFITS[refit])}). `*_test_r`: the same choice fitted on train alone and scored on the internal "
    "test split, which no choice saw: the out-of-sample estimate. `*_val_r_optimistic`: the val r of the choice, "
    "the maximum over candidates and alphas on the split that chose them, so biased upward.\n\n")
    + outputs.markdown_table(summary_rows))
outputs.save_figure(report / "candidate_shares.png", plots.plot_candidate_shares(summary_rows, ["untuned"]
                                                                                 + candidate_sets))
if make_zip:
    def write_zip(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(submission.glob("subj*/*_pred_test.npy")):
                archive.write(path, path.relative_to(submission).as_posix())
    outputs.atomic_write(submission / "submission.zip", write_zip, suffix=".tmp.zip")
print(outputs.format_table([r for r in summary_rows if r["vertices"] == "all vertices"],
                           ["subject", "hemisphere", "n_vertices", "median_test_r", "median_val_r_optimistic"]))
for line in missing_parts(submission):
    print(line)
print(f"submission written to {submission_dir}")
