"""Any backbone through every stage (layer search, CL and reg training, results, submission) at small images, its
checkpoints refusing another backbone, and an external feature set planted with a known gain."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torchvision

import backbones
import features
import models
import options
import paths
import study
import utils
from conftest import make_tiny_dataset, run_script as run

N_TEST = 5
# embedding sizes read off the networks' own definitions: torchvision's resnet18 head, the stand-in ViT's width
EMBED = {"resnet18": torchvision.models.resnet18().fc.in_features, "tiny-vit": 32}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def read_csv(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


# resnet18 on three of its layers (the stages' cost grows with the layers); the tiny ViT on its default ones
@pytest.fixture(scope="module", params=[("resnet18", ("layer1.0", "layer3.1", "fc")), ("tiny-vit", ())])
def staged(request, tmp_path_factory, one_thread):
    """Random-init resnet18 and the tiny ViT at 32 px: search, one CL and one reg epoch (lh FFA-1), the tuned
    searches, single-subject results and a submission."""
    name, layers = request.param
    tmp = tmp_path_factory.mktemp(name)
    root = make_tiny_dataset(tmp / "data", subjects=(1,), n_images=64, n_test_images=N_TEST)
    out = tmp / "out"
    common = [f"--data_dir={root}", f"--out_dir={out}", f"--backbone={name}", "--weights=none", "--image_size=32",
              "--device=cpu"]
    train = [*common, "--hemisphere=lh", "--roi=FFA-1", "--epochs=1", "--batch_size=16", "--num_threads=1"]
    common.append(f"--layers={','.join(layers)}")  # the stages that read features
    run("get_best_alex_layer.py", *common, "--hemispheres=lh", "--feature_sets=untuned")
    run("cl_model_training.py", *train)
    run("reg_model_training.py", *train)
    run("get_best_alex_layer.py", *common, "--hemispheres=lh", "--rois=FFA-1")
    run("generate_results.py", *common, f"--results_dir={tmp / 'R'}", "--result_type=single-subj",
        "--hemispheres=lh", "--rois=FFA-1,V1v", "--feature_sets=untuned,reg,cl", "--comparisons=cl:untuned,cl:reg",
        "--n_bootstrap=20", "--n_permutations=20")
    run("predict_test_images.py", *common, f"--submission_dir={tmp / 'sub'}", "--hemispheres=lh")
    return {"name": name, "root": root, "out": out, "results": tmp / "R", "submission": tmp / "sub",
            "layers": list(layers or backbones.default_layers(name))}


def _hooked(net, layer: str, x: torch.Tensor) -> np.ndarray:
    """A layer's output by a forward hook on its module: independent of the fx feature extractor."""
    got = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, a, out: got.update(x=out.flatten(1)))
    with torch.no_grad():
        net(x)
    handle.remove()
    return got["x"].numpy()


def test_every_stage_runs_on_another_backbone(staged):
    name, out, layers = staged["name"], staged["out"], staged["layers"]
    search = json.loads(paths.search_file(out, 1, "lh", backbone=name).read_text())
    assert search["layers"] == layers and search["key"]["backbone"] == name
    assert search["search_seconds"] > 0 and {e["layer"] for e in search["rois"].values()} - {None} <= set(layers)
    # the reduction of each layer, stated in the search: its width measured by a hooked forward of the same network
    torch.manual_seed(0)
    net = backbones.build(name, "none").eval()
    x = torch.zeros(1, 3, 32, 32)
    n_train = len(utils.get_split(out, 1, utils.list_images(utils.find_subject(staged["root"], 1).train_images))
                  ["train"])
    for layer, entry in search["reduction"].items():
        if layer in dict(net.named_modules()):
            assert entry["features"] == _hooked(net, layer, x).shape[1], layer
        wide = entry["features"] > 1000
        assert entry["reduction"] == ("PCA fitted on train" if wide else "none")
        assert entry["kept"] == (min(1000, n_train - 1) if wide else entry["features"]), layer

    # both heads sit on the backbone's embedding, and the checkpoint records the backbone
    for method in ("cl", "reg"):
        run_dir = paths.model_dir(out, method, "lh", "FFA-1", subject=1, backbone=name)
        ckpt = models.load_checkpoint(run_dir / "best.pt")
        assert ckpt["model_spec"]["backbone"] == {"name": name, "source": backbones.parse(name).source,
                                                  "weights": "none", "embed_dim": EMBED[name]}
        head = "image_proj.weight" if method == "cl" else "readout.0.weight"
        assert ckpt["model"][head].shape[1] == EMBED[name]
        tuned_search = json.loads(paths.search_file(out, 1, "lh", run_dir=run_dir).read_text())
        assert tuned_search["rois"]["FFA-1"]["layer"] in layers and tuned_search["key"]["backbone"] == name

    rows = {r["roi"]: r for r in read_csv(staged["results"] / "subj01" / "single_subj_lh.csv")}
    for feature_set in ("untuned", "reg", "cl"):
        assert np.isfinite(float(rows["FFA-1"][f"median_r_{feature_set}"])), feature_set
    assert rows["FFA-1"]["layer_cl"] in layers and rows["V1v"]["median_r_cl"] == "nan"
    prediction = np.load(staged["submission"] / "subj01" / "lh_pred_test.npy")
    assert prediction.shape == (N_TEST, 240) and np.isfinite(prediction).all()


def test_untuned_features_are_the_networks_own_outputs(staged):
    """The cached features of the embedding layer equal a hooked forward of the seeded random init, on images
    normalised by hand with the weights' mean and std."""
    name = staged["name"]
    settings = study.StudySettings(str(staged["root"]), str(staged["out"]), ("lh",), backbone=name, weights="none",
                                   image_size=32, device="cpu", layers=tuple(staged["layers"]))
    encoding_study = study.EncodingStudy(settings)
    layer = staged["layers"][-1]
    assert layer == backbones.default_layers(name)[-1]  # the embedding
    cached = encoding_study.features(1, settings.untuned_spec(), [layer])[layer]
    d = encoding_study.subject(1)
    pre = backbones.preprocessing(name, "none")
    images = torch.from_numpy(np.asarray(d.images[d.split["test"]])).double() / 255
    x = ((images - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)).float()
    torch.manual_seed(0)
    np.testing.assert_allclose(cached["test"], _hooked(backbones.build(name, "none").eval(), layer, x), atol=1e-4)


def test_a_checkpoint_refuses_another_backbone(staged, tmp_path):
    name, out = staged["name"], staged["out"]
    other = "tiny-vit" if name == "resnet18" else "resnet18"
    path = paths.model_dir(out, "cl", "lh", "FFA-1", subject=1, backbone=name) / "best.pt"
    for load in (models.load_tuned_backbone, models.load_roi_model):
        with pytest.raises(options.DataError) as err:
            load(path, "cpu", other)
        assert str(err.value) == f"{path}: trained with backbone {name}, not {other}"
    # a study of the other backbone refuses the checkpoint copied under its models folder
    moved = paths.model_dir(out, "cl", "lh", "FFA-1", subject=1, backbone=other) / "best.pt"
    moved.parent.mkdir(parents=True)
    moved.write_bytes(path.read_bytes())
    settings = study.StudySettings(str(staged["root"]), str(out), ("lh",), backbone=other, weights="none",
                                   image_size=32, device="cpu", layers=("fc",) if other == "resnet18" else ())
    encoding_study = study.EncodingStudy(settings)
    [(_, run_dir)] = encoding_study.run_dirs("cl", 1, "lh", "FFA-1")
    with pytest.raises(options.DataError, match=f"trained with backbone {name}, not {other}$"):
        encoding_study.checkpoint(run_dir)
    moved.unlink()


def test_old_alexnet_checkpoints_load_as_alexnet(tmp_path):
    """Checkpoints from before backbones were recorded (model_spec without 'backbone', or its bare name)."""
    torch.manual_seed(0)
    model = models.build_model("reg", 12, "none").eval()
    path = tmp_path / "best.pt"
    models.save_checkpoint(path, model, roi_voxel_indices=np.arange(12), subjects=[1])
    ckpt = torch.load(path, weights_only=True)
    for recorded in (None, "alexnet"):
        old = {**ckpt, "model_spec": {k: v for k, v in ckpt["model_spec"].items() if k != "backbone"}}
        if recorded:
            old["model_spec"]["backbone"] = recorded
        torch.save(old, tmp_path / f"old_{recorded}.pt")
        assert models.checkpoint_backbone(tmp_path / f"old_{recorded}.pt") == "alexnet"
        with pytest.raises(options.DataError, match="trained with backbone alexnet, not resnet18"):
            models.load_roi_model(tmp_path / f"old_{recorded}.pt", "cpu", "resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(models.load_tuned_backbone(tmp_path / "old_None.pt", "cpu", "alexnet")(x), model.backbone(x))


def test_fixed_size_backbones_refuse_another_image_size(tmp_path):
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,), n_images=8)
    config = {"data_dir": str(root), "out_dir": str(tmp_path / "out"), "backbone": "tiny-vit", "weights": "none",
              "image_size": 64}
    with pytest.raises(options.DataError) as err:
        study.StudySettings.from_options(config)
    assert str(err.value) == "--image_size=64: tiny-vit takes only 32 px images (its input size is fixed); use " \
                             "--image_size=32"
    with pytest.raises(options.DataError, match="not layers of resnet18; its defaults are layer1.0, "):
        study.StudySettings.from_options({**config, "backbone": "resnet18", "layers": ["layer9"]})
    settings = study.StudySettings.from_options({**config, "backbone": "torchvision:alexnet", "weights": "DEFAULT"})
    assert (settings.backbone, settings.weights, settings.layers) == ("alexnet", "IMAGENET1K_V1",
                                                                     backbones.ALEXNET_LAYERS)
    assert settings.untuned_spec() == "untuned:alexnet:IMAGENET1K_V1"
    # AlexNet's caches keep their name from before backbones; another backbone's name its network
    assert features.backbone_spec_tag(settings.untuned_spec()) == features.backbone_spec_tag("untuned:IMAGENET1K_V1")
    assert features.backbone_spec_tag("untuned:timm:test_resnet:none").startswith("untuned-timm-test_resnet-none-")


@pytest.mark.parametrize("name", ["timm:test_resnet", "open_clip:test-ViT-tiny"])
def test_timm_and_open_clip_backbones_train_and_give_features(name, tmp_path):
    """Where the extras are installed: one CL epoch, then the tuned backbone's features by the study's cache."""
    if name.startswith("open_clip"):
        open_clip = pytest.importorskip("open_clip")
        text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
        config = {"embed_dim": 24, "text_cfg": text, "vision_cfg": vision}
        (tmp_path / "test-ViT-tiny.json").write_text(json.dumps(config))
        open_clip.add_model_config(tmp_path / "test-ViT-tiny.json")
    else:
        pytest.importorskip("timm")
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,), n_images=40)
    out = tmp_path / "out"
    run("cl_model_training.py", f"--data_dir={root}", f"--out_dir={out}", f"--backbone={name}", "--weights=none",
        "--image_size=32", "--device=cpu", "--hemisphere=lh", "--roi=FFA-1", "--epochs=1", "--batch_size=12",
        "--num_threads=1")
    run_dir = paths.model_dir(out, "cl", "lh", "FFA-1", subject=1, backbone=name)
    pre = backbones.preprocessing(name, "none")
    tuned = models.load_tuned_backbone(run_dir / "best.pt", "cpu", name)
    assert models.normalisation(tuned) == (pre.mean, pre.std)
    settings = study.StudySettings(str(root), str(out), ("lh",), backbone=name, weights="none", image_size=32,
                                   device="cpu")
    encoding_study = study.EncodingStudy(settings)
    layer = settings.layers[-1]  # the embedding: the CL head's input
    feats = encoding_study.features(1, str(run_dir / "best.pt"), [layer])[layer]
    d = encoding_study.subject(1)
    x = torch.from_numpy(np.asarray(d.images[d.split["val"]])).float() / 255
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(feats["val"], tuned(x).numpy(), atol=1e-4)
    assert feats["val"].shape[1] == models.load_checkpoint(run_dir / "best.pt")["model_spec"]["backbone"]["embed_dim"]


# ---- external feature sets ----

def _planted_external(root, features_dir, n_signal: int = 40, seed: int = 1):
    """external:planted for subject 1: 'layer10' carries 5 latent factors that drive lh FFA-1 (images carry none of
    them, so the untuned network cannot see them); 'layer2' is noise (float16). -> (FFA-1 vertices, the
    challenge images' noiseless FFA-1 responses)."""
    rng = np.random.default_rng(seed)
    subject_files = utils.find_subject(root, 1)
    n_train, n_challenge = len(utils.list_images(subject_files.train_images)), N_TEST
    latent, latent_challenge = rng.normal(size=(n_train, 5)), rng.normal(size=(n_challenge, 5))
    mixing = rng.normal(size=(5, n_signal))
    folder = features_dir / "subj01" / "planted"
    folder.mkdir(parents=True)
    for kind, z in (("train", latent), ("challenge", latent_challenge)):
        np.save(folder / f"{kind}_layer10.npy", (z @ mixing + 0.1 * rng.normal(size=(len(z), n_signal))).astype(
            np.float32))
        np.save(folder / f"{kind}_layer2.npy", rng.normal(size=(len(z), 8)).astype(np.float16))
    ffa = utils.roi_voxel_indices(subject_files, "lh")["FFA-1"]
    readout = rng.normal(size=(5, len(ffa)))
    fmri = np.load(subject_files.fmri["lh"])
    fmri[:, ffa] = latent @ readout + 0.5 * rng.normal(size=(n_train, len(ffa)))
    np.save(subject_files.fmri["lh"], fmri.astype(np.float32))
    return ffa, latent_challenge @ readout


@pytest.fixture(scope="module")
def external(tmp_path_factory, one_thread):
    """A planted external set searched, compared with the untuned stand-in network and submitted."""
    tmp = tmp_path_factory.mktemp("external")
    root = make_tiny_dataset(tmp / "data", subjects=(1,), n_images=120, n_test_images=N_TEST)
    ffa, challenge_truth = _planted_external(root, tmp / "feats")
    common = [f"--data_dir={root}", f"--out_dir={tmp / 'out'}", "--backbone=tiny", "--weights=none",
              "--image_size=32", "--device=cpu", f"--features_dir={tmp / 'feats'}", "--pca_components=20"]
    run("get_best_alex_layer.py", *common, "--hemispheres=lh", "--feature_sets=untuned,external:planted")
    run("generate_results.py", *common, f"--results_dir={tmp / 'R'}", "--result_type=single-subj",
        "--hemispheres=lh", "--rois=FFA-1", "--feature_sets=untuned,external:planted",
        "--comparisons=external:planted:untuned", "--n_bootstrap=20", "--n_permutations=200")
    run("predict_test_images.py", *common, f"--submission_dir={tmp / 'sub'}", "--hemispheres=lh",
        "--tuned_sets=external:planted")
    return {"out": tmp / "out", "results": tmp / "R", "submission": tmp / "sub", "ffa": ffa,
            "challenge_truth": challenge_truth}


def test_external_set_is_found_by_the_search_and_the_statistics(external):
    search = json.loads(paths.search_file(external["out"], 1, "lh", feature_set="external:planted").read_text())
    assert search["layers"] == ["layer2", "layer10"]  # natural order of the files' layer names
    assert search["rois"]["FFA-1"]["layer"] == "layer10"
    assert search["reduction"] == {
        "layer2": {"features": 8, "kept": 8, "reduction": "none"},
        "layer10": {"features": 40, "kept": 20, "reduction": "PCA fitted on train"}}
    [row] = read_csv(external["results"] / "subj01" / "single_subj_lh.csv")
    assert row["layer_external:planted"] == "layer10"
    assert float(row["median_r_external:planted"]) > float(row["median_r_untuned"]) + 0.3
    assert float(row["perm_p_median_external:planted_vs_untuned"]) < 0.05


def test_external_set_goes_through_the_submission(external):
    choice = np.load(external["submission"] / "report" / "subj01" / "lh_choice.npz")
    ffa = external["ffa"]
    assert (choice["kind"][ffa] == "external:planted").mean() > 0.9 and set(choice["layer"][ffa]) == {"layer10"}
    prediction = np.load(external["submission"] / "subj01" / "lh_pred_test.npy")[:, ffa]
    # the challenge rows of the external files, in file order, reach the predictions: r with the planted truth
    truth = external["challenge_truth"]
    r = [np.corrcoef(prediction[:, v], truth[:, v])[0, 1] for v in range(len(ffa))]
    assert np.median(r) > 0.8


def test_external_files_are_checked_with_one_line_errors(tmp_path):
    good = np.zeros((6, 4), dtype=np.float32)
    cases = {"rows": (good[:5], "5 rows; expected 6, one per training image"),
             "dtype": (good.astype(np.float64), "dtype float64; expected float16 or float32"),
             "ndim": (good.reshape(6, 2, 2), "shape (6, 2, 2); expected 2-D (images x features)"),
             "nan": (np.where(np.arange(24).reshape(6, 4) == 13, np.nan, good).astype(np.float32),
                     "non-finite values (NaN or inf), first in row 3")}
    for name, (array, message) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(options.DataError) as err:
            features.read_external(tmp_path / f"{name}.npy", 6, "training image, in fMRI row order")
        assert str(err.value).startswith(f"{tmp_path / name}.npy: {message}") and "\n" not in str(err.value)
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(options.DataError, match="text.npy: not a readable .npy array"):
        features.read_external(tmp_path / "text.npy", 6, "training image")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 6, dtype=object))
    with pytest.raises(options.DataError, match="objects.npy: not a readable .npy array"):
        features.read_external(tmp_path / "objects.npy", 6, "training image")
    with pytest.raises(options.DataError, match="subj02/clip: no train_<layer>.npy files for external:clip"):
        features.external_layers(tmp_path, 2, "external:clip")
    with pytest.raises(options.OptionsError, match="needs --features_dir"):
        features.external_layers("", 2, "external:clip")
