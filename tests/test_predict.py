"""predict_test_images.py: submission files, an independent scikit-learn pipeline, a planted tuned backbone."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import features
import image_cache
import models
import outputs
import paths
import utils
from conftest import make_tiny_dataset, run_script as run

LAYERS = "features.5,classifier.6"
TINY = ["--weights=none", "--image_size=64", "--device=cpu", f"--layers={LAYERS}"]
N_TEST = 7


@pytest.fixture(scope="module")
def untuned_submission(tmp_path_factory):
    """One subject, 96 training and 7 test images, untuned candidates only; refit=all and refit=train+val, each
    again on a copy of the data whose internal-test-split fMRI alone was replaced."""
    import shutil
    tmp = tmp_path_factory.mktemp("predict")
    root = make_tiny_dataset(tmp / "data", subjects=(1,), n_images=96, n_test_images=N_TEST)
    out = tmp / "out"
    run("get_best_alex_layer.py", f"--data_dir={root}", f"--out_dir={out}", *TINY)
    changed = Path(shutil.copytree(root, tmp / "changed"))
    test_rows = utils.get_split(out, 1, utils.list_images(utils.find_subject(root, 1).train_images))["test"]
    rng = np.random.default_rng(1)
    for hemi in utils.HEMISPHERES:
        path = utils.find_subject(changed, 1).fmri[hemi]
        fmri = np.load(path)
        fmri[test_rows] = rng.normal(size=(len(test_rows), fmri.shape[1]))
        np.save(path, fmri)
    found = {"root": root, "out": out, "test_rows": test_rows}
    for data, suffix in ((root, ""), (changed, "_changed")):
        for refit in ("all", "train+val"):
            folder = tmp / f"{refit}{suffix}"
            found[f"{refit}{suffix}_stdout"] = run(
                "predict_test_images.py", f"--data_dir={data}", f"--out_dir={out}", *TINY,
                f"--submission_dir={folder}", "--features=untuned", f"--refit={refit}",
                *(["--hemispheres=lh"] if refit == "train+val" or suffix else []))
            found[f"{refit}{suffix}"] = folder
    return found


def test_submission_files_shapes_and_determinism(untuned_submission):
    import zipfile
    folder = untuned_submission["all"]
    for hemi in utils.HEMISPHERES:
        a = np.load(folder / "subj01" / f"{hemi}_pred_test.npy")
        assert a.dtype == np.float32 and a.shape == (N_TEST, 240) and np.isfinite(a).all()
    # subjXX/ holds the predictions alone (no sidecars), so a hand-made zip of it is a clean submission
    assert sorted(p.name for p in (folder / "subj01").iterdir()) == ["lh_pred_test.npy", "rh_pred_test.npy"]
    names = zipfile.ZipFile(folder / "submission.zip").namelist()
    assert sorted(names) == ["subj01/lh_pred_test.npy", "subj01/rh_pred_test.npy"]
    report = folder / "report"
    assert (report / "estimate.csv").is_file() and (report / "candidate_shares.png").is_file()
    manifest = json.loads((report / "submission.json").read_text())
    assert manifest["files"]["subj01/lh_pred_test.npy"]["shape"] == [N_TEST, 240]
    assert manifest["refit"].startswith("all: train + val + test")
    assert json.loads(outputs.sidecar_path(report / "submission.json").read_text())["options"]["refit"] == "all"
    # train+val predictions do not read the internal test split's fMRI: identical when only it changed
    np.testing.assert_array_equal(np.load(untuned_submission["train+val"] / "subj01" / "lh_pred_test.npy"),
                                  np.load(untuned_submission["train+val_changed"] / "subj01" / "lh_pred_test.npy"))


def test_refit_all_uses_the_internal_test_split(untuned_submission):
    """Only the test split's fMRI changed: the val choice is the same, the refit=all predictions are not."""
    for refit in ("all", "train+val"):
        before = np.load(untuned_submission[refit] / "report" / "subj01" / "lh_choice.npz")
        after = np.load(untuned_submission[f"{refit}_changed"] / "report" / "subj01" / "lh_choice.npz")
        np.testing.assert_array_equal(before["layer"], after["layer"])
        np.testing.assert_array_equal(before["alpha"], after["alpha"])
    a = np.load(untuned_submission["all"] / "subj01" / "lh_pred_test.npy")
    b = np.load(untuned_submission["all_changed"] / "subj01" / "lh_pred_test.npy")
    assert np.abs(a - b).max() > 0.05 * np.abs(a).max()


def test_a_submission_lacking_subjects_or_hemispheres_warns(untuned_submission):
    full = untuned_submission["all_stdout"].splitlines()
    lh_only = untuned_submission["train+val_stdout"].splitlines()
    missing_subjects = "no predictions for subj02, subj03, subj04, subj05, subj06, subj07, subj08"
    assert [line for line in full if line.startswith("warning:")] == [
        f"warning: {untuned_submission['all']}: {missing_subjects}; the challenge scores subj01..subj08"]
    assert [line for line in lh_only if line.startswith("warning:")] == [
        f"warning: {untuned_submission['train+val']}: {missing_subjects}; the challenge scores subj01..subj08",
        f"warning: {untuned_submission['train+val']}: subj01 has no rh_pred_test.npy; the challenge scores both "
        "hemispheres"]


def _val_r(y, p):
    yc, pc = y - y.mean(0), p - p.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (yc * pc).sum(0) / np.sqrt((yc * yc).sum(0) * (pc * pc).sum(0))


def test_untuned_submission_equals_an_independent_sklearn_pipeline(untuned_submission):
    """PCA on train, unit scale, Ridge per vertex and alpha, each vertex's best (layer, alpha) by val r; that
    choice fitted on train and scored on the internal test split (the out-of-sample estimate), and refitted on
    train + val + test (refit=all) or train + val to predict the test images in file order: scikit-learn and numpy."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    import encoding
    root, out = untuned_submission["root"], untuned_submission["out"]
    subject_files = utils.find_subject(root, 1)
    split = utils.get_split(out, 1, utils.list_images(subject_files.train_images))
    train_cache = image_cache.load_image_cache(out, 1, utils.list_images(subject_files.train_images), size=64)
    test_files = utils.list_images(subject_files.test_images)      # file order = the submission's row order
    test_images = np.stack([image_cache.decode_image(p, 64) for p in test_files])
    backbone = features.load_backbone("untuned:none", "cpu")
    layers = LAYERS.split(",")
    raw_train = features.extract_features(backbone, train_cache, None, layers)
    raw_test = features.extract_features(backbone, test_images, None, layers)
    sets = {}
    for layer in layers:
        x, xt = raw_train[layer], raw_test[layer]
        if x.shape[1] > 1000:  # as the pipeline: PCA(min(1000, n_train - 1)) for layers wider than 1000
            pca = PCA(n_components=min(1000, len(split["train"]) - 1, x.shape[1]), svd_solver="randomized",
                      random_state=0).fit(x[split["train"]])
            x, xt = pca.transform(x), pca.transform(xt)
        scale = np.sqrt(np.mean(np.var(x[split["train"]].astype(np.float64), axis=0)))
        sets[layer] = (x / scale, xt / scale)
    refit_rows = {"all": np.concatenate([split["train"], split["val"], split["test"]]),
                  "train+val": np.concatenate([split["train"], split["val"]])}
    for hemi in utils.HEMISPHERES:
        y = np.load(subject_files.fmri[hemi]).astype(np.float64)
        y_train, y_val = y[split["train"]], y[split["val"]]
        val_r = np.array([[_val_r(y_val, Ridge(alpha=a).fit(sets[layer][0][split["train"]], y_train)
                                  .predict(sets[layer][0][split["val"]])) for a in encoding.ALPHAS] for layer in layers])
        flat = val_r.reshape(-1, y.shape[1])                    # (layer, alpha) x vertices, layers first
        best = np.nanargmax(flat, axis=0)
        layer_of, alpha_of = best // len(encoding.ALPHAS), best % len(encoding.ALPHAS)
        expected = {refit: np.empty((N_TEST, y.shape[1])) for refit in refit_rows}
        internal_test = np.empty((len(split["test"]), y.shape[1]))
        for (li, ai) in {(int(li), int(ai)) for li, ai in zip(layer_of, alpha_of)}:
            vertices = np.flatnonzero((layer_of == li) & (alpha_of == ai))
            x, xt = sets[layers[li]]
            ridge = Ridge(alpha=encoding.ALPHAS[ai])
            internal_test[:, vertices] = ridge.fit(x[split["train"]], y_train[:, vertices]).predict(
                x[split["test"]]).reshape(len(split["test"]), len(vertices))
            for refit, rows in refit_rows.items():
                fit = ridge.fit(x[rows], y[rows][:, vertices])
                expected[refit][:, vertices] = fit.predict(xt).reshape(N_TEST, len(vertices))
        test_r = _val_r(y[split["test"]], internal_test)
        for refit in ("all", "train+val") if hemi == "lh" else ("all",):
            choice = np.load(untuned_submission[refit] / "report" / "subj01" / f"{hemi}_choice.npz")
            ours = np.load(untuned_submission[refit] / "subj01" / f"{hemi}_pred_test.npy")
            # the chosen candidate's val r is the best one up to float32 rounding (near-ties may break either way)
            np.testing.assert_allclose(choice["val_r"], flat.max(0), atol=1e-4)
            same = (choice["layer"] == np.array(layers)[layer_of]) & np.isclose(choice["alpha"],
                                                                                np.array(encoding.ALPHAS)[alpha_of])
            assert same.mean() > 0.97
            # float32 ridge vs float64 sklearn on responses of unit scale
            np.testing.assert_allclose(ours[:, same], expected[refit][:, same], atol=1e-4)
            # the out-of-sample estimate: the val choice fitted on train alone, r on the internal test split; float32
            # predictions keep eps * |mean| / sd relative precision in their deviations (alpha 1e7: nearly constant)
            tolerance = 1e-4 + 10 * np.finfo(np.float32).eps * np.abs(internal_test.mean(0)) / internal_test.std(0)
            assert (np.abs(choice["test_r"] - test_r) <= tolerance)[same].all()
        rows = list(csv.DictReader(open(untuned_submission["all"] / "report" / "estimate.csv")))
        overall = next(r for r in rows if r["hemisphere"] == hemi and r["vertices"] == "all vertices")
        assert float(overall["median_test_r"]) == pytest.approx(np.nanmedian(choice["test_r"]), abs=1e-6)
        v1v = next(r for r in rows if r["hemisphere"] == hemi and r["vertices"] == "V1v")
        v1v_idx = utils.roi_voxel_indices(subject_files, hemi)["V1v"]
        assert float(v1v["mean_test_r"]) == pytest.approx(test_r[v1v_idx].mean(), abs=1e-4)
        assert float(v1v["mean_val_r_optimistic"]) == pytest.approx(flat.max(0)[v1v_idx].mean(), abs=1e-4)


def test_a_vertex_covered_by_a_planted_tuned_backbone_picks_it(tmp_path):
    """FFA-1's responses are a readout of a tuned backbone's conv layer: its vertices choose the CL candidate."""
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,), n_images=120, n_test_images=3)
    out = tmp_path / "out"
    torch.manual_seed(0)  # the tuned model's init and its "fine-tuning", whatever ran before
    untuned = features.load_backbone("untuned:none", "cpu")
    tuned = models.build_model("cl", 30, "none")
    tuned.backbone.load_state_dict(untuned.state_dict())
    with torch.no_grad():  # the "fine-tuning" changed conv2 only
        tuned.backbone.features[3].weight.copy_(torch.randn_like(tuned.backbone.features[3].weight) * 0.05)
    subject_files = utils.find_subject(root, 1)
    ffa = utils.roi_voxel_indices(subject_files, "lh")["FFA-1"]
    models.save_checkpoint(paths.model_dir(out, "cl", "lh", "FFA-1", subject=1) / "best.pt", tuned,
                           roi_voxel_indices=ffa,
                           subjects=[1], method="cl")
    cache = image_cache.load_image_cache(out, 1, utils.list_images(subject_files.train_images), size=64)
    readout = features.extract_features(tuned.backbone.eval(), cache, None, ["features.5"])["features.5"]
    scores = np.linalg.svd(readout - readout.mean(0), full_matrices=False)[0][:, :5]
    fmri = np.load(subject_files.fmri["lh"])
    rng = np.random.default_rng(0)
    fmri[:, ffa] = (scores @ rng.normal(size=(5, len(ffa)))) / scores.std() + 0.3 * rng.normal(size=(120, len(ffa)))
    np.save(subject_files.fmri["lh"], fmri.astype(np.float32))
    common = [f"--data_dir={root}", f"--out_dir={out}", *TINY]
    run("get_best_alex_layer.py", *common, "--hemispheres=lh")
    run("predict_test_images.py", *common, f"--submission_dir={tmp_path / 'sub'}", "--hemispheres=lh",
        "--features=cl", "--tuned_layer=features.5")
    choice = np.load(tmp_path / "sub" / "report" / "subj01" / "lh_choice.npz")
    assert (choice["kind"][ffa] == "cl").mean() > 0.9
    assert not (np.delete(choice["kind"], ffa) == "cl").any()   # a tuned backbone only competes in its ROI
