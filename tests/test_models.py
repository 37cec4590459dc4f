"""models.py: backbones, the CL / reg models (per subject and pooled), CL loss, BatchNorm, checkpoints, DDP equivalence.

Where the backbone does not matter the models use the small stand-in network (backbone="tiny"); AlexNet itself
keeps a few shape, weight and feature tests.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

import backbones
import features
import models
import options
import paths
import runtime
import training

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_cl_loss(f: np.ndarray, g: np.ndarray, t: float, direction: str) -> float:
    """The paper's loss written out with loops: s_ij = cos(fMRI i, image j)."""
    n = len(f)
    s = [[float(np.dot(f[i], g[j]) / (np.linalg.norm(f[i]) * np.linalg.norm(g[j]))) for j in range(n)]
         for i in range(n)]
    total = 0.0
    for k in range(n):
        if direction == "image":   # image k against every fMRI i
            denominator = sum(math.exp(s[i][k] / t) for i in range(n))
        else:                      # fMRI k against every image j
            denominator = sum(math.exp(s[k][j] / t) for j in range(n))
        total += -math.log(math.exp(s[k][k] / t) / denominator)
    return total / n


def test_contrastive_loss_matches_formula_and_is_permutation_invariant():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(9, 5))
    g = f + 0.7 * rng.normal(size=(9, 5))  # correlated pairs, so the two directions differ
    ft, gt = torch.from_numpy(f), torch.from_numpy(g)
    image_dir = reference_cl_loss(f, g, 0.3, "image")
    fmri_dir = reference_cl_loss(f, g, 0.3, "fmri")
    assert abs(image_dir - fmri_dir) > 1e-3
    assert models.contrastive_loss(ft, gt, 0.3).item() == pytest.approx(image_dir, rel=1e-10)
    assert models.contrastive_loss(ft, gt, 0.3, symmetric=True).item() == pytest.approx(
        0.5 * (image_dir + fmri_dir), rel=1e-10)
    assert models.contrastive_loss(ft, gt, 0.7).item() == pytest.approx(reference_cl_loss(f, g, 0.7, "image"),
                                                                         rel=1e-10)
    perm = torch.from_numpy(rng.permutation(9))
    for symmetric in (False, True):
        assert models.contrastive_loss(ft[perm], gt[perm], 0.3, symmetric).item() == pytest.approx(
            models.contrastive_loss(ft, gt, 0.3, symmetric).item(), rel=1e-12)
    # scale invariance (cosine similarities) and float32 inputs
    assert models.contrastive_loss(3 * ft.float(), gt.float(), 0.3).item() == pytest.approx(image_dir, rel=1e-5)


def test_cl_dimensions_follow_the_original():
    # per subject: h = int(0.8 V), z = int(0.2 V) (the original's get_CL_model), for every ROI size
    for v in range(1, 30001):
        assert models.cl_dims([v], "subject") == (int(v * 0.8), int(v * 0.2)), v
    # pooled: z = int(0.25 h), h = 5741 or the mean voxel count of the pooled subjects
    assert models.cl_dims([100, 201, 50], "constant") == (5741, 1435)
    assert models.cl_dims([100, 201, 50], "average") == (117, 29)
    with pytest.raises(options.DataError, match="one subject"):
        models.cl_dims([100, 201], "subject")
    with pytest.raises(options.DataError, match="h_method"):
        models.cl_dims([100], "median")


def layer_list(module):
    return [(type(m).__name__, getattr(m, "in_features", getattr(m, "num_features", None)),
             getattr(m, "out_features", None), getattr(m, "bias", None) is not None) for m in module]


def test_cl_head_and_projections_are_exactly_the_originals():
    torch.manual_seed(0)
    cl = models.build_model("cl", 50, "none", backbone="tiny")
    h, z = 40, 10
    relu = ("ReLU", None, None, False)
    assert layer_list(cl.head) == [("Linear", h, h, True), ("DistBatchNorm1d", h, None, True), relu,
                                   ("Linear", h, h, True), ("DistBatchNorm1d", h, None, True), relu,
                                   ("Linear", h, z, False)]
    assert layer_list([cl.image_proj, *cl.fmri_proj]) == [("Linear", 1000, h, False), ("Linear", 50, h, False)]
    pooled = models.build_model("cl", [30, 50, 40], "none", backbone="tiny", h_method="average")
    assert (pooled.hidden, pooled.embed_dim) == (40, 10)
    assert layer_list(pooled.head) == layer_list(cl.head)
    assert layer_list(pooled.fmri_proj) == [("Linear", v, 40, False) for v in (30, 50, 40)]
    reg = models.build_model("reg", [30, 50], "none", backbone="tiny")
    assert layer_list(reg.readout) == [("Linear", 1000, 30, True), ("Linear", 1000, 50, True)]


def test_models_per_subject_and_pooled_shapes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    cl = models.build_model("cl", [30, 50], "none", 0.0, "tiny", "average")
    for source, v in enumerate((30, 50)):
        f, g = cl(x, torch.randn(4, v), source)
        assert f.shape == g.shape == (4, 10)
    reg = models.build_model("reg", [30, 50], "none", dropout=0.0, backbone="tiny")
    assert reg(x).shape == (4, 30) and reg(x, 1).shape == (4, 50)
    assert all(m.p == 0.0 for m in reg.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(options.DataError, match="unknown method"):
        models.build_model("svm", 50, "none")
    with pytest.raises(options.DataError, match="unknown backbone"):
        models.build_model("cl", 50, "none", backbone="resnet")
    with pytest.raises(options.DataError, match="no pretrained weights"):
        models.build_model("cl", 50, "IMAGENET1K_V1", backbone="tiny")


def test_alexnet_models_and_their_tuned_backbone(tmp_path):
    torch.manual_seed(0)
    cl = models.build_model("cl", 50, "none")
    assert isinstance(cl.backbone, torchvision.models.AlexNet) and (cl.hidden, cl.embed_dim) == (40, 10)
    assert [m.p for m in cl.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    x = torch.randn(2, 3, 64, 64)  # AlexNet's conv stack needs >= 63 px
    f, g = cl(x, torch.randn(2, 50))
    assert f.shape == g.shape == (2, 10)
    path = paths.checkpoint_file(paths.model_dir(tmp_path, "cl", "lh", "V1v", subject=1))
    models.save_checkpoint(path, cl, roi_voxel_indices=np.arange(50), subjects=[1])
    backbone = models.load_tuned_backbone(path)
    assert isinstance(backbone, torchvision.models.AlexNet)
    cl.eval()
    with torch.no_grad():
        assert torch.equal(backbone(x), cl.backbone(x))


def test_dist_batchnorm_is_batchnorm_outside_distributed():
    torch.manual_seed(0)
    ours, ref = models.DistBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(torch.linspace(0.5, 2, 6))
            bn.bias.copy_(torch.linspace(-1, 1, 6))
    x = (torch.randn(10, 6, dtype=torch.float64) * 3 + 1).float()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    # and the training-mode formula written out: biased batch variance in the output, unbiased in running_var
    xd = x.double()
    expected = (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + ref.eps) * ours.weight.double() \
        + ours.bias.double()
    assert torch.allclose(y_ours.double(), expected, atol=1e-5) and torch.allclose(y_ours, y_ref, atol=1e-6)
    assert torch.allclose(ours.running_var.double(), 0.9 + 0.1 * xd.var(0, unbiased=True), atol=1e-5)
    assert torch.allclose(ours.running_var, ref.running_var) and torch.allclose(ours.running_mean, ref.running_mean)
    weights = torch.randn(10, 6)
    (y_ours * weights).sum().backward()
    (y_ref * weights).sum().backward()
    assert torch.allclose(x_ours.grad, x_ref.grad, atol=1e-5) and torch.allclose(ours.weight.grad, ref.weight.grad)
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_batch_statistics_evaluates_like_training_and_changes_nothing():
    torch.manual_seed(0)
    model = models.build_model("cl", [20, 30], "none", 0.5, "tiny", "average").train()
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32), torch.randn(8, 30), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 3, 32, 32), torch.randn(6, 20)
    reference = backbones.set_dropout(copy.deepcopy(model), 0.0).train()  # train mode, no dropout
    with torch.no_grad():
        expected = reference(x, y, 0)
        with models.batch_statistics(model):
            got = model(x, y, 0)
            assert torch.equal(model(x, y, 0)[1], got[1])  # dropout is off: deterministic
        eval_mode = copy.deepcopy(model).eval()(x, y, 0)
    for a, b, c in zip(got, expected, eval_mode):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, c, atol=1e-3)  # running statistics would give something else
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise, num_batches_tracked included
    assert model.training and all(m.training for m in model.modules())


def test_alexnet_weights_from_a_file_and_a_failed_download(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = backbones.build("alexnet", "none")
    path = tmp_path / "alexnet.pth"
    torch.save(net.state_dict(), path)
    loaded = models.roi_backbone("alexnet", str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert backbones.spec(loaded)["weights"] == "file:alexnet.pth"
    with pytest.raises(options.DataError, match="not found"):
        models.roi_backbone("alexnet", str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(options.DataError, match="not a alexnet state dict"):
        models.roi_backbone("alexnet", str(tmp_path / "bad.pth"))

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(options.DataError) as err:
        models.roi_backbone("alexnet", "DEFAULT")
    message = str(err.value)
    assert "--weights=none" in message and ".pth" in message and str(torch.hub.get_dir()) in message
    # DEFAULT and its torchvision name are one (caches and layer searches of either spelling are shared)
    assert models.weights_name("alexnet", "DEFAULT") == "IMAGENET1K_V1" == models.weights_name("alexnet",
                                                                                                 "IMAGENET1K_V1")
    assert models.weights_name("resnet50", "DEFAULT") == "IMAGENET1K_V2"
    assert models.weights_name("tiny", "None") == "none" and models.weights_name("tiny", str(path)) == str(path)


def test_prepare_images_normalises_and_flips():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    mean = np.array(runtime.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(runtime.IMAGENET_STD).reshape(1, 3, 1, 1)
    expected = (batch / 255.0 - mean) / std
    out = runtime.prepare_images(batch, "cpu")
    assert out.dtype == torch.float32 and np.allclose(out.numpy(), expected, atol=1e-5)
    flipped = runtime.prepare_images(torch.from_numpy(batch), "cpu", channels_last=True, flip=[True, False, True])
    assert flipped.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(flipped.numpy()[[0, 2]], expected[[0, 2], :, :, ::-1], atol=1e-5)
    assert np.allclose(flipped.numpy()[1], expected[1], atol=1e-5)


def test_extract_features_matches_direct_forward():
    torch.manual_seed(0)
    net = backbones.build("alexnet", "none").eval()
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 64, 64), dtype=np.uint8)
    indices = np.array([5, 1, 3, 6])
    feats = features.extract_features(net, images, indices, ("features.2", "features.12", "classifier.6"),
                                    batch_size=3)
    mean = torch.tensor(runtime.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(runtime.IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(images[indices]).double() / 255 - mean) / std
    with torch.no_grad():
        direct = {"features.2": net.features[:3](x.float()).flatten(1), "features.12": net.features(x.float()).flatten(1),
                  "classifier.6": net(x.float())}
    for layer, value in direct.items():
        assert feats[layer].dtype == np.float32 and feats[layer].shape == tuple(value.shape)
        assert np.allclose(feats[layer], value.numpy(), atol=1e-4, rtol=1e-4), layer
    dims = features.feature_dims(net, backbones.ALEXNET_LAYERS, 64)
    assert dims["features.2"] == feats["features.2"].shape[1] and dims["classifier.6"] == 1000
    out = {"classifier.6": np.zeros((4, 1000), dtype=np.float32)}
    features.extract_features(net, images, indices, ("classifier.6",), batch_size=2, out=out)
    assert np.allclose(out["classifier.6"], feats["classifier.6"], atol=1e-5)


def test_checkpoint_round_trip_per_subject_and_pooled(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("cl", 30, "none", backbone="tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=3)
    f, g = model(torch.randn(4, 3, 32, 32), torch.randn(4, 30))
    models.contrastive_loss(f, g, 0.3).backward()
    optimizer.step()
    scheduler.step(1.0)
    path = paths.checkpoint_file(paths.model_dir(tmp_path, "cl", "rh", "FFA-1", subject=3, seed=2), "last")
    assert path == tmp_path / "models" / "alexnet" / "cl" / "subj03" / "rh" / "FFA-1" / "seed2" / "last.pt"
    script_options = {"epochs": 2, "rois": ["V1v"], "out_dir": Path("x")}
    metrics = [{"epoch": 1, "val_loss": np.float32(0.5)}]
    models.save_checkpoint(path, model, optimizer, scheduler, 1, script_options, np.array([4, 5, 9]), metrics, subjects=[3],
                           done=False)
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["epoch"] == 1 and raw["options"]["out_dir"] == "x" and raw["metrics"][0]["val_loss"] == 0.5
    assert [i.tolist() for i in raw["roi_voxel_indices"]] == [[4, 5, 9]] and raw["done"] is False
    assert raw["subjects"] == [3] and raw["model_spec"] == {
        "method": "cl", "n_voxels": [30], "hidden": 24, "embed_dim": 6,
        "backbone": {"name": "tiny", "source": "stand-in", "weights": "none", "embed_dim": 1000}}
    ckpt = models.load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    optimizer2 = torch.optim.Adam(model.parameters(), lr=1e-4)
    optimizer2.load_state_dict(ckpt["optimizer"])
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models.load_tuned_backbone(path)(x), model.backbone(x))
        assert torch.equal(features.load_backbone(str(path), "cpu")(x), model.backbone(x))
        assert torch.equal(models.load_roi_model(path).embed_images(x), model.embed_images(x))

    # pooled: the subjects and each one's voxels travel with it; the loaders rebuild it from its model_spec
    pooled = models.build_model("reg", [30, 20], "none", backbone="tiny").eval()
    pooled_path = paths.checkpoint_file(paths.model_dir(tmp_path, "reg", "lh", "PPA", exclude_subject=4,
                                                        backbone="timm:resnet18"))
    assert pooled_path == tmp_path / "models" / "timm-resnet18" / "pooled-reg" / "lh" / "PPA" / "loso-subj04" / \
        "seed0" / "best.pt"
    assert paths.model_dir(tmp_path, "cl", "rh", "V1v", pooled_h_method="average").parts[-4:] == \
        ("pooled-cl-havg", "rh", "V1v", "seed0")
    with pytest.raises(options.OptionsError, match="pooled_h_method"):
        paths.model_dir(tmp_path, "cl", "rh", "V1v", pooled_h_method="subject")
    models.save_checkpoint(pooled_path, pooled, roi_voxel_indices=[np.arange(30), np.arange(5, 25)], subjects=[1, 2])
    raw = models.load_checkpoint(pooled_path)
    assert raw["subjects"] == [1, 2] and [len(i) for i in raw["roi_voxel_indices"]] == [30, 20]
    with torch.no_grad():
        assert torch.equal(models.load_roi_model(pooled_path)(x, 1), pooled(x, 1))
        assert torch.equal(features.load_backbone(str(pooled_path), "cpu")(x), pooled.backbone(x))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(options.DataError, match="unreadable checkpoint"):
        models.load_checkpoint(tmp_path / "junk.pt")
    torch.save({**raw, "format": "roi_model_v1"}, tmp_path / "old.pt")
    with pytest.raises(options.DataError, match="roi_model_v1: retrain"):
        models.load_checkpoint(tmp_path / "old.pt")
    # a pickle with Python objects is refused without PyTorch's advice to unpickle it anyway
    torch.save({"format": models.CHECKPOINT_FORMAT, "thing": Path("x")}, tmp_path / "foreign.pt")
    with pytest.raises(options.DataError, match="not a checkpoint of this repo") as err:
        models.load_checkpoint(tmp_path / "foreign.pt")
    assert "weights_only" not in str(err.value)


def test_bfloat16_checkpoint_halves_the_weights_and_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("reg", 40, "none").eval()
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    models.save_checkpoint(full, model, roi_voxel_indices=np.arange(40), subjects=[1])
    models.save_checkpoint(half, model, roi_voxel_indices=np.arange(40), subjects=[1], weights_dtype="bfloat16")
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    loaded = models.load_roi_model(half)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype
        if value.is_floating_point():  # bfloat16 keeps 8 bits of mantissa: relative error <= 2^-8
            assert torch.allclose(got, value, rtol=2 ** -8, atol=0)


def test_sweep_shards_cover_every_job_once():
    every = training.sweep_jobs(["lh", "rh"], [], seeds=[0, 3])
    assert len(every) == 124 and len(set(every)) == 124 and {s for _, _, s in every} == {0, 3}
    for n in (1, 2, 3, 5, 62, 130):
        shards = [training.sweep_jobs(["lh", "rh"], [], [0, 3], training.parse_shard(f"{i}/{n}")) for i in range(n)]
        flat = [job for shard in shards for job in shard]
        assert sorted(flat) == sorted(every) and len(flat) == len(every)
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(options.DataError, match="shard"):
            training.parse_shard(bad)
    with pytest.raises(options.DataError, match="unknown ROI"):
        training.sweep_jobs(["lh"], ["FFA-9"])
    with pytest.raises(options.DataError, match="hemisphere"):
        training.sweep_jobs(["left"], ["V1v"])
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(options.OptionsError, match="seeds"):
            training.sweep_jobs(["lh"], ["V1v"], bad)


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = models.build_model("cl", 30, "none", backbone="tiny").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, g = model(torch.randn(6, 3, 32, 32), torch.randn(6, 30))
        loss = models.contrastive_loss(f, g, 0.3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# Tolerances of DDP vs one process: the two differ only in how sums are split and ordered (BatchNorm statistics
# over ranks, gathered embeddings, per-rank matmuls over 7 or 6 rows). A float sum of K terms carries a
# relative rounding error of about eps * sqrt(K) (random-walk accumulation); the widest reduction here is the
# backbone's 1000 outputs into the image projection, and a few such layers chain, with softmax and BatchNorm over
# 13 rows amplifying differences modestly: allow 30 * eps * sqrt(1000) relative, the same rule for both dtypes
# (float64 thereby checks the algebra is exact to rounding, float32 that nothing worse than rounding happens).
WIDEST_SUM = 1000


def rounding_bound(dtype_name: str) -> float:
    return 30 * torch.finfo(getattr(torch, dtype_name)).eps * math.sqrt(WIDEST_SUM)


def test_ddp_gloo_loss_and_gradients_equal_single_process(tmp_path):
    """2 CPU ranks (gloo) on an uneven global batch of 13: loss, gradients, BN statistics = one process."""
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(REPO / "tests" / "ddp_check.py"), str(out)],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["rows_per_rank"] == 7
    cases = {case: r for case, r in report.items() if isinstance(r, dict)}
    assert sorted(cases) == ["cl-float64", "cl-pooled-float64", "cl-symmetric-float32", "reg-float32",
                             "reg-float64", "reg-pooled-float64"]
    for case, r in cases.items():
        bound = rounding_bound(case.rsplit("-", 1)[1])
        for key in ("loss_rel_diff", "grad_max_rel_diff", "grad_max_diff_over_total", "buffer_max_rel_diff"):
            assert r[key] <= bound, (case, key, r[key], bound)
        assert r["grads_without_gradient_agree"], case
    # a pooled step of subject 2 leaves subject 1's projection (CL) / read-out weight and bias (reg) without gradient
    assert cases["cl-pooled-float64"]["n_without_gradient"] == 1
    assert cases["reg-pooled-float64"]["n_without_gradient"] == 2


def test_a_network_read_through_a_feature_extractor_is_freed_when_dropped(monkeypatch):
    """Tracing a network for its feature extractor leaves reference cycles that hold it; a large network's
    extractor collects them on exit, so a dropped network is freed at once, not at the cyclic collector's next (rare)
    run (searches, results). Here the tiny network counts as large."""
    import gc
    import weakref

    import features
    monkeypatch.setattr(features, "COLLECT_ABOVE_PARAMS", 0)
    gc.disable()  # as between the collector's rare automatic runs
    try:
        net = models.roi_backbone("tiny", "none")
        features.extract_features(net, np.zeros((2, 3, 32, 32), dtype=np.uint8), None, ["5"], device="cpu")
        weights = weakref.ref(net.get_submodule("0").weight)  # the first convolution's
        del net
        assert weights() is None
    finally:
        gc.enable()
        gc.unfreeze()  # what the large-network path froze: back in the collector's view for the other tests
        features._FROZEN.clear()
