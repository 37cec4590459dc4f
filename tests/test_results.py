"""Best layer, single-subject, cross-subject and classification results on tiny data."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import encoding
import features
import image_cache
import models
import outputs
import paths
import study
import utils
from conftest import REPO, make_tiny_dataset, run_script as run

TINY = ["--weights=none", "--image_size=64", "--device=cpu"]


def read_csv(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def plant_layer_signal(root, out, layer: str, subjects=(1,), noise: float = 0.3, seed: int = 0, backbone=None):
    """Overwrite the fMRI with a linear readout of one layer of a backbone (default: untuned, weights=none)."""
    rng = np.random.default_rng(seed)
    backbone = backbone if backbone is not None else features.load_backbone("untuned:none", "cpu")
    for subject in subjects:
        subject_files = utils.find_subject(root, subject)
        images = utils.list_images(subject_files.train_images)
        cache = image_cache.load_image_cache(out, subject, images, size=64)
        feats = features.extract_features(backbone, cache, None, [layer], batch_size=64, device="cpu")[layer]
        # A readout of the layer's top 10 principal components: what PCA + ridge on that layer can recover.
        centred = feats - feats.mean(0)
        scores = np.linalg.svd(centred, full_matrices=False)[0][:, :10]
        for hemi in utils.HEMISPHERES:
            width = np.load(subject_files.fmri[hemi], mmap_mode="r").shape[1]
            signal = scores @ rng.normal(size=(10, width))
            signal /= signal.std(0)
            np.save(subject_files.fmri[hemi], (signal + noise * rng.normal(size=signal.shape)).astype(np.float32))


def test_best_layer_recovers_the_planted_layer(tmp_path):
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,), n_images=160)
    plant_layer_signal(root, tmp_path / "out", "features.5")
    layers = "features.2,features.5,features.12,classifier.6"
    run("get_best_alex_layer.py", f"--data_dir={root}", f"--out_dir={tmp_path / 'out'}", "--hemispheres=lh",
        f"--layers={layers}", *TINY)
    search_file = paths.search_file(tmp_path / "out", 1, "lh")
    assert search_file == tmp_path / "out" / "searches" / "alexnet" / "untuned" / "subj01" / "lh.json"
    saved = json.loads(search_file.read_text())
    best = {roi: e["layer"] for roi, e in saved["rois"].items() if e["layer"]}
    nonempty = [r for r in utils.ROI_NAMES if r not in ("mTL-bodies", "mTL-faces", "aTL-faces", "mTL-words")]
    assert sorted(best) == sorted(nonempty)  # empty ROIs have no layer, never a crash
    assert set(best.values()) == {"features.5"}
    assert saved["layers"] == layers.split(",") and saved["key"]["selection"] == "val-halves-crossfit"
    assert all(v is None for v in saved["rois"]["mTL-faces"]["scores"].values())
    assert search_file.with_suffix(".png").stat().st_size > 10_000


def test_test_split_never_reaches_fitting_or_selection(tmp_path):
    """Scramble the test split's images and fMRI: best layers, their scores and trained weights are unchanged."""
    clean = make_tiny_dataset(tmp_path / "clean", subjects=(1,), n_images=96)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(clean, poisoned)
    subject_files = utils.find_subject(poisoned, 1)
    images = utils.list_images(subject_files.train_images)
    test_rows = utils.make_split(images)["test"]
    rng = np.random.default_rng(1)
    for i in test_rows:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images[i])
    for hemi in utils.HEMISPHERES:
        fmri = np.load(subject_files.fmri[hemi])
        fmri[test_rows] = 50 * rng.normal(size=fmri[test_rows].shape)
        np.save(subject_files.fmri[hemi], fmri)

    outputs = {}
    for name, root in (("clean", clean), ("poisoned", poisoned)):
        out = tmp_path / f"out_{name}"
        run("get_best_alex_layer.py", f"--data_dir={root}", f"--out_dir={out}", "--hemispheres=lh",
            "--layers=features.5,classifier.6", *TINY)
        run("cl_model_training.py", f"--data_dir={root}", f"--out_dir={out}", "--roi=FFA-1", "--epochs=2",
            "--batch_size=24", *TINY)
        outputs[name] = out
    searched = [json.loads(paths.search_file(outputs[name], 1, "lh").read_text())["rois"] for name in outputs]
    assert searched[0] == searched[1]
    a, b = (models.load_checkpoint(paths.model_dir(outputs[name], "cl", "lh", "FFA-1", subject=1) / "best.pt")
            for name in ("clean", "poisoned"))
    for key, tensor in a["model"].items():
        assert np.array_equal(tensor.numpy(), b["model"][key].numpy()), key


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tiny end-to-end run: best layer, CL and reg models for FFA-1 of two subjects, all result types."""
    tmp = tmp_path_factory.mktemp("pipeline")
    root = make_tiny_dataset(tmp / "data", subjects=(1, 2), n_images=96)
    rng = np.random.default_rng(0)
    for k, name in enumerate(("faces", "places", "words")):
        folder = root / "imagefolder" / name
        folder.mkdir(parents=True)
        for i in range(16):
            img = np.full((32, 32, 3), 60 * k, dtype=np.uint8) + rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    for subject in (1, 2):   # the challenge vertices on fsaverage, among fsaverage5's (drawn as cortical maps)
        for hemi in utils.HEMISPHERES:
            on_fsaverage = np.zeros(utils.FSAVERAGE_VERTICES, dtype=np.float32)
            on_fsaverage[np.linspace(0, 10241, 240).astype(int)] = 1
            np.save(utils.find_subject(root, subject).fsaverage_mask_path(hemi), on_fsaverage)
    out, results = tmp / "out", tmp / "Results"
    common = [f"--data_dir={root}", f"--out_dir={out}", *TINY]
    run("get_best_alex_layer.py", *common, "--hemispheres=lh", "--layers=features.5,features.12,classifier.6")
    for subject in (1, 2):
        for method in ("cl", "reg"):
            run(f"{method}_model_training_all_rois.py", *common, f"--subjects={subject}", "--hemispheres=lh",
                "--rois=FFA-1", "--epochs=1", "--batch_size=24")
    run("get_best_alex_layer.py", *common, "--hemispheres=lh", "--layers=features.5,features.12,classifier.6")
    proc = run("generate_results.py", *common, f"--results_dir={results}", "--hemispheres=lh",
               "--layers=features.5,features.12,classifier.6",
               "--rois=FFA-1,V1v,mTL-faces,midparietal", "--cross_subj_rois=FFA-1", "--classification_rois=FFA-1",
               "--n_bootstrap=50", "--classification_max_per_class=16", f"--classification_root={root / 'imagefolder'}",
               "--map_sets=cl", "--map_comparisons=cl:untuned")
    return {"root": root, "out": out, "results": results, "stdout": proc}


def test_single_subject_tables(pipeline):
    rows = {r["roi"]: r for r in read_csv(pipeline["results"] / "subj01" / "single_subj_lh.csv")}
    assert list(rows) == ["FFA-1", "V1v", "mTL-faces", "midparietal"]
    assert rows["mTL-faces"]["n_voxels"] == "0" and rows["mTL-faces"]["note"] == "empty ROI"
    for method in ("untuned", "reg", "cl"):
        assert np.isfinite(float(rows["FFA-1"][f"median_r_{method}"]))
    assert np.isfinite(float(rows["V1v"]["median_r_untuned"]))
    assert rows["V1v"]["median_r_cl"] == "nan"  # no model trained for V1v: an empty cell, the rest computed
    assert 0 <= float(rows["FFA-1"]["pct_improved_cl_vs_untuned"]) <= 100
    assert 0 < float(rows["FFA-1"]["perm_p_median_cl_vs_untuned"]) <= 1
    voxel_r = np.load(pipeline["results"] / "subj01" / "single_subj_lh_voxel_r.npz")
    sidecar = outputs.sidecar_path(pipeline["results"] / "subj01" / "single_subj_lh_voxel_r.npz")
    sets = json.loads(sidecar.read_text())["rows"]
    assert sets == ["untuned", "reg", "cl", "pooled-reg", "pooled-cl"]
    assert voxel_r["FFA-1"].shape == (5, 30) and np.isfinite(voxel_r["FFA-1"][:3]).all()
    assert np.isnan(voxel_r["FFA-1"][3:]).all()  # no pooled model trained here: rows of NaN, not zeros
    # The table's numbers are the medians of the saved per-voxel r.
    for k, method in enumerate(("untuned", "reg", "cl")):
        assert float(rows["FFA-1"][f"median_r_{method}"]) == pytest.approx(np.median(voxel_r["FFA-1"][k]), abs=1e-6)
    # % improved, recomputed from the per-voxel r.
    expected = 100 * np.mean(voxel_r["FFA-1"][2] > voxel_r["FFA-1"][0])
    assert float(rows["FFA-1"]["pct_improved_cl_vs_untuned"]) == pytest.approx(expected)
    summary = read_csv(pipeline["results"] / "single_subj_summary.csv")
    assert [r["group"] for r in summary] == ["Early", "Higher", "Anatomical", "All"]
    for name in ("single_subj_lh_accuracy.png", "single_subj_lh.md"):
        assert (pipeline["results"] / "subj01" / name).is_file()
        assert outputs.sidecar_path(pipeline["results"] / "subj01" / name).is_file()


def test_every_output_has_its_sidecar_in_meta_and_the_study_figures_are_drawn(pipeline):
    results = pipeline["results"]
    files = [p for p in results.rglob("*") if p.is_file() and p.parent.name != "meta"]
    assert not [p for p in results.rglob("*.meta.json")]   # no sidecar beside its file
    assert [p for p in files if not outputs.sidecar_path(p).is_file()] == []
    assert {p.name for p in results.iterdir()} >= {"meta", "subj01", "subj02", "cross_subj", "classification"}
    figures = ["accuracy_lh.png", "subject_pairs_vs_untuned.png", "subject_pairs_vs_reg.png", "difference_heatmaps.png",
               "voxel_hexbin_cl_vs_untuned.png", "alpha_distribution.png", "training_curves.png",
               "cross_subj/transfer_overview_median_r.png", "cross_subj/transfer_overview_pct_improved.png",
               "cross_subj/cl_lh_FFA-1_pct_improved.png", "retrieval.png"]
    assert [f for f in figures if not (results / f).is_file()] == []
    for subject in ("subj01", "subj02"):   # --map_sets=cl --map_comparisons=cl:untuned; no noise ceiling here
        assert sorted(p.name for p in (results / subject / "maps").glob("*.png")) == [
            "accuracy_cl.png", "difference_cl_minus_untuned.png", "layer_cl.png"]


def test_tidy_tables_hold_the_wide_tables_numbers(pipeline):
    results = pipeline["results"]
    tidy = read_csv(results / "single_subj_tidy.csv")
    wide = {(r["subject"], r["roi"]): r for s in ("subj01", "subj02")
            for r in read_csv(results / s / "single_subj_lh.csv")}
    assert {r["subject"] for r in tidy} == {"1", "2"} and {r["roi"] for r in tidy} == {"FFA-1", "V1v", "midparietal"}
    for r in tidy:
        row = wide[(r["subject"], r["roi"])]
        if r["kind"] == "set" and r["statistic"] in ("mean_r", "median_r"):
            assert float(r["value"]) == pytest.approx(float(row[f"{r['statistic']}_{r['feature_set']}"]))
            assert float(r["ci_low"]) == pytest.approx(float(row[f"{r['statistic']}_{r['feature_set']}_ci_low"]))
            assert r["layer"] == row[f"layer_{r['feature_set']}"]
        if r["kind"] == "comparison" and r["statistic"] == "median_diff":
            pair = f"{r['feature_set']}_vs_{r['baseline']}"
            assert float(r["p"]) == pytest.approx(float(row[f"perm_p_median_{pair}"]))
    counts = {(r["kind"], r["feature_set"]) for r in tidy if r["roi"] == "FFA-1" and r["subject"] == "1"}
    assert counts >= {("set", "untuned"), ("set", "cl"), ("set", "reg"), ("comparison", "cl"), ("retrieval", "cl")}
    transfer = read_csv(results / "cross_subj" / "transfer_tidy.csv")
    matrix = np.load(results / "cross_subj" / "reg_lh_FFA-1_pct_improved.npy")
    for r in (r for r in transfer if r["method"] == "reg" and r["statistic"] == "pct_improved"):
        assert float(r["value"]) == pytest.approx(matrix[int(r["source"]) - 1, int(r["target"]) - 1])
    assert len([r for r in transfer if r["statistic"] == "median_r"]) == 2 * 4   # 2 methods x 2 x 2 subjects


def test_vertex_arrays_hold_the_voxel_r_and_nan_elsewhere(pipeline):
    root, results = pipeline["root"], pipeline["results"]
    for subject in (1, 2):
        s2 = paths.subject_dir_name(subject)
        arrays = np.load(results / s2 / "lh_vertex_r.npz")
        voxel_r = np.load(results / s2 / "single_subj_lh_voxel_r.npz")
        sets = json.loads(outputs.sidecar_path(results / s2 / "single_subj_lh_voxel_r.npz").read_text())["rows"]
        rois = utils.roi_voxel_indices(utils.find_subject(root, subject), "lh")
        fitted = np.zeros(240, dtype=bool)
        for roi in ("FFA-1", "V1v", "midparietal"):
            fitted[rois[roi]] = True
        assert arrays["r_untuned"].shape == (240,) and np.isfinite(arrays["r_untuned"][fitted]).all()
        assert np.isnan(arrays["r_untuned"][~fitted]).all() and (arrays["roi"][~fitted] == -1).all()
        assert np.isnan(arrays["r_cl"][~np.isin(np.arange(240), rois["FFA-1"])]).all()   # CL: FFA-1 models only
        names = list(arrays["rois"])
        for roi in ("FFA-1", "V1v", "midparietal"):
            own = arrays["roi"][rois[roi]] == names.index(roi)   # vertices whose value is this ROI's fit
            for k, feature_set in enumerate(sets):
                np.testing.assert_array_equal(arrays[f"r_{feature_set}"][rois[roi][own]], voxel_r[roi][k][own])
        overlap = np.intersect1d(rois["V1v"], rois["midparietal"])   # prf-visualrois comes before streams
        assert overlap.size and (arrays["roi"][overlap] == names.index("V1v")).all()
        streams = list(arrays["families"]).index("streams")
        np.testing.assert_array_equal(arrays["r_untuned_by_family"][streams, rois["midparietal"]],
                                      voxel_r["midparietal"][0])
        layers = list(arrays["layers"])
        wide = {r["roi"]: r for r in read_csv(results / s2 / "single_subj_lh.csv")}
        assert layers[int(arrays["layer_cl"][rois["FFA-1"][0]])] == wide["FFA-1"]["layer_cl"]


def test_untuned_score_matches_sklearn_and_scipy(pipeline):
    """Recompute the untuned FFA-1 test r of subject 1 with sklearn Ridge (per-voxel alphas) and scipy."""
    from scipy.stats import pearsonr
    from sklearn.linear_model import Ridge
    root, out = pipeline["root"], pipeline["out"]
    alphas = list(encoding.ALPHAS)  # the grid generate_results.py used (its default)
    encoding_study = study.EncodingStudy(study.StudySettings(
        str(root), str(out), ("lh",), weights="none", image_size=64, layers=("features.5", "features.12",
                                                                              "classifier.6"), device="cpu"))
    layer = encoding_study.layer_of("untuned", 1, "lh", "FFA-1")
    feats = encoding.unit_scale(encoding_study.features(1, "untuned:none", [layer])[layer])
    d = encoding_study.subject(1)
    idx, split = d.roi_voxel_indices["lh"]["FFA-1"], d.split
    y = np.asarray(d.fmri["lh"])[:, idx]
    val_r = np.array([[pearsonr(y[split["val"], v], Ridge(alpha=a).fit(feats["train"], y[split["train"]])
                                .predict(feats["val"])[:, v])[0] for v in range(len(idx))] for a in alphas])
    chosen = np.asarray(alphas)[val_r.argmax(0)]
    test_r = [pearsonr(y[split["test"], v], Ridge(alpha=chosen[v]).fit(feats["train"], y[split["train"], v])
                       .predict(feats["test"]))[0] for v in range(len(idx))]
    voxel_r = np.load(pipeline["results"] / "subj01" / "single_subj_lh_voxel_r.npz")["FFA-1"][0]
    np.testing.assert_allclose(voxel_r, test_r, atol=2e-3)


def test_cross_subject_matrices(pipeline):
    folder = pipeline["results"] / "cross_subj"
    for method in ("cl", "reg"):
        median_r = np.load(folder / f"{method}_lh_FFA-1_median_r.npy")
        improved = np.load(folder / f"{method}_lh_FFA-1_pct_improved.npy")
        assert median_r.shape == improved.shape == (2, 2)
        assert np.isfinite(median_r).all() and ((improved >= 0) & (improved <= 100)).all()
        assert (folder / f"{method}_lh_FFA-1_median_r.png").is_file()
    # The diagonal is the single-subject CL score of the same model.
    rows = {r["roi"]: r for r in read_csv(pipeline["results"] / "subj02" / "single_subj_lh.csv")}
    diag = np.load(folder / "cl_lh_FFA-1_median_r.npy")[1, 1]
    assert diag == pytest.approx(float(rows["FFA-1"]["median_r_cl"]), abs=1e-6)


def test_classification_probe(pipeline):
    rows = read_csv(pipeline["results"] / "classification" / "classification_imagefolder.csv")
    assert [(r["method"], r["subject"]) for r in rows] == [("untuned", "0"), ("cl", "1"), ("reg", "1"),
                                                           ("cl", "2"), ("reg", "2")]
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and r["n_classes"] == "3"
    # Three colour-separated classes: even a random-init AlexNet separates them.
    assert float(rows[0]["accuracy"]) > 0.6
    assert (pipeline["results"] / "classification" / "classification_imagefolder.png").is_file()


def test_missing_or_corrupt_layer_search_is_one_clear_error(tmp_path):
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,))
    command = [sys.executable, str(REPO / "generate_results.py"), f"--data_dir={root}", f"--out_dir={tmp_path / 'out'}",
               f"--results_dir={tmp_path / 'R'}", "--result_type=single-subj", *TINY]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]  # (after the image cache's progress bar)
    assert line.startswith("error: ") and "lh.json: no layer search; run get_best_alex_layer.py " \
        "--feature_sets=untuned --subjects=1" in line
    search_file = paths.search_file(tmp_path / "out", 1, "lh")
    search_file.parent.mkdir(parents=True)
    search_file.write_text("{not json")
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: {search_file}: unreadable layer search")
    assert "\n" not in proc.stderr.strip() and not (tmp_path / "R").exists()
    assert not (tmp_path / "R").exists()


def test_tuned_layer_search_finds_a_conv_layer_gain(tmp_path):
    """Fine-tuning that changed only conv2: the default search reads the tuned net at features.5 and finds
    the gain; reading it at classifier.6 (the old default) cannot see it."""
    import torch
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,), n_images=160)
    out = tmp_path / "out"
    untuned = features.load_backbone("untuned:none", "cpu")
    tuned_cl = models.build_model("cl", 30, "none")
    tuned_cl.backbone.load_state_dict(untuned.state_dict())
    with torch.no_grad():  # "fine-tuning" moved conv2 (the layer under features.5) and nothing else
        tuned_cl.backbone.features[3].weight.copy_(torch.randn_like(tuned_cl.backbone.features[3].weight) * 0.05)
    ffa = utils.roi_voxel_indices(utils.find_subject(root, 1), "lh")["FFA-1"]
    run_dir = paths.model_dir(out, "cl", "lh", "FFA-1", subject=1)
    models.save_checkpoint(run_dir / "best.pt", tuned_cl, roi_voxel_indices=ffa,
                           method="cl", n_voxels=30)
    plant_layer_signal(root, out, "features.5", backbone=tuned_cl.backbone.eval())
    common = [f"--data_dir={root}", f"--out_dir={out}", "--hemispheres=lh", *TINY,
              "--layers=features.2,features.5,features.12,classifier.6"]
    run("get_best_alex_layer.py", *common)
    rows = {}
    for tuned_layer in ("best", "classifier.6"):
        results = tmp_path / f"R_{tuned_layer}"
        run("generate_results.py", *common, f"--results_dir={results}", "--result_type=single-subj",
            "--rois=FFA-1", "--methods=cl", f"--tuned_layer={tuned_layer}", "--n_bootstrap=20")
        rows[tuned_layer] = read_csv(results / "subj01" / "single_subj_lh.csv")[0]
    best, logits = rows["best"], rows["classifier.6"]
    assert best["layer_cl"] == "features.5" and logits["layer_cl"] == "classifier.6"
    search = json.loads(paths.search_file(out, 1, "lh", run_dir=run_dir).read_text())["rois"]["FFA-1"]
    assert search["layer"] == "features.5" and len(search["scores"]) == 4
    # the planted readout is recovered from the tuned conv layer, not from the logits or the untuned net
    assert float(best["median_r_cl"]) > float(logits["median_r_cl"]) + 0.1
    assert float(best["median_r_cl"]) > float(best["median_r_untuned"]) + 0.03
