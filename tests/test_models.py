"""models.py: backbone loading, image preparation, feature extraction, CL loss, checkpoints, DDP equivalence."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from scipy import stats

import features
import models
import training
import utils

REPO = Path(__file__).resolve().parents[1]


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


def test_models_shapes_and_paper_dimensions():
    torch.manual_seed(0)
    cl = models.build_model("cl", 50, "none")
    assert (cl.hidden, cl.embed_dim) == (40, 10)
    assert cl.image_proj.bias is None and cl.fmri_proj.bias is None
    assert cl.image_proj.in_features == 1000 and cl.fmri_proj.in_features == 50
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in cl.head) == 2
    x = torch.randn(4, 3, 64, 64)
    f, g = cl(x, torch.randn(4, 50))
    assert f.shape == g.shape == (4, 10)
    reg = models.build_model("reg", 50, "none", dropout=0.0)
    assert reg(x).shape == (4, 50)
    assert all(m.p == 0.0 for m in reg.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(utils.DataError, match="unknown method"):
        models.build_model("svm", 50, "none")


def test_dist_batchnorm_is_batchnorm_outside_distributed():
    torch.manual_seed(0)
    ours, ref = models.DistBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    x = torch.randn(10, 6) * 3 + 1
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var) and torch.allclose(ours.running_mean, ref.running_mean)


def test_build_alexnet_weight_sources(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = models.build_alexnet("none")
    path = tmp_path / "alexnet.pth"
    torch.save(net.state_dict(), path)
    loaded = models.build_alexnet(str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(utils.DataError, match="not found"):
        models.build_alexnet(str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(utils.DataError, match="not an AlexNet state dict"):
        models.build_alexnet(str(tmp_path / "bad.pth"))

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(utils.DataError) as err:
        models.build_alexnet("IMAGENET1K_V1")
    message = str(err.value)
    assert "--weights=none" in message and ".pth" in message and str(torch.hub.get_dir()) in message


def test_prepare_images_normalises_and_flips():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    mean = np.array(features.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(features.IMAGENET_STD).reshape(1, 3, 1, 1)
    expected = (batch / 255.0 - mean) / std
    out = features.prepare_images(batch, "cpu")
    assert out.dtype == torch.float32 and np.allclose(out.numpy(), expected, atol=1e-5)
    flipped = features.prepare_images(torch.from_numpy(batch), "cpu", channels_last=True, flip=[True, False, True])
    assert flipped.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(flipped.numpy()[[0, 2]], expected[[0, 2], :, :, ::-1], atol=1e-5)
    assert np.allclose(flipped.numpy()[1], expected[1], atol=1e-5)


def test_extract_features_matches_direct_forward():
    torch.manual_seed(0)
    net = models.build_alexnet("none").eval()
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 64, 64), dtype=np.uint8)
    indices = np.array([5, 1, 3, 6])
    feats = features.extract_features(net, images, indices, ("features.2", "features.12", "classifier.6"),
                                    batch_size=3)
    mean = torch.tensor(features.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(features.IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(images[indices]).double() / 255 - mean) / std
    with torch.no_grad():
        direct = {"features.2": net.features[:3](x.float()).flatten(1), "features.12": net.features(x.float()).flatten(1),
                  "classifier.6": net(x.float())}
    for layer, value in direct.items():
        assert feats[layer].dtype == np.float32 and feats[layer].shape == tuple(value.shape)
        assert np.allclose(feats[layer], value.numpy(), atol=1e-4, rtol=1e-4), layer
    dims = features.feature_dims(net, models.ALEXNET_LAYERS, 64)
    assert dims["features.2"] == feats["features.2"].shape[1] and dims["classifier.6"] == 1000
    out = {"classifier.6": np.zeros((4, 1000), dtype=np.float32)}
    features.extract_features(net, images, indices, ("classifier.6",), batch_size=2, out=out)
    assert np.allclose(out["classifier.6"], feats["classifier.6"], atol=1e-5)


def test_checkpoint_round_trip_and_tuned_backbone(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("cl", 30, "none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=3)
    f, g = model(torch.randn(4, 3, 64, 64), torch.randn(4, 30))
    models.contrastive_loss(f, g, 0.3).backward()
    optimizer.step()
    scheduler.step(1.0)
    path = models.checkpoint_path(tmp_path, "cl", 3, "rh", "FFA-1", "last")
    assert path == tmp_path / "models" / "cl" / "subj03" / "rh" / "FFA-1" / "last.pt"
    options = {"epochs": 2, "rois": ["V1v"], "out_dir": Path("x")}
    metrics = [{"epoch": 1, "val_loss": np.float32(0.5)}]
    models.save_checkpoint(path, model, optimizer, scheduler, 1, options, np.array([4, 5, 9]), metrics, done=False)
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["epoch"] == 1 and raw["options"]["out_dir"] == "x" and raw["metrics"][0]["val_loss"] == 0.5
    assert raw["roi_voxel_indices"].tolist() == [4, 5, 9] and raw["done"] is False
    ckpt = models.load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    optimizer2 = torch.optim.Adam(model.parameters(), lr=1e-4)
    optimizer2.load_state_dict(ckpt["optimizer"])
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    backbone = models.load_tuned_backbone(path)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone(x), model.backbone(x), atol=1e-6)
    full = models.load_roi_model(path)
    with torch.no_grad():
        assert torch.allclose(full.embed_images(x), model.embed_images(x), atol=1e-6)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(utils.DataError, match="unreadable checkpoint"):
        models.load_checkpoint(tmp_path / "junk.pt")


def test_epoch_batches_partition_and_depend_on_seed_and_epoch():
    idx = np.arange(100, 137)
    batches = training.epoch_batches(idx, 10, seed=0, epoch=3)
    assert [len(b) for b in batches] == [10, 9, 9, 9]  # near-equal, none larger than batch_size
    assert np.array_equal(np.sort(np.concatenate(batches)), idx)
    assert all(np.array_equal(b, np.sort(b)) for b in batches)
    again = training.epoch_batches(idx, 10, seed=0, epoch=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = training.epoch_batches(idx, 10, seed=0, epoch=4)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_sweep_shards_cover_every_job_once():
    every = training.sweep_jobs(["lh", "rh"], [])
    assert len(every) == 62 and len(set(every)) == 62
    for n in (1, 2, 3, 5, 62, 70):
        shards = [training.sweep_jobs(["lh", "rh"], [], training.parse_shard(f"{i}/{n}")) for i in range(n)]
        flat = [job for shard in shards for job in shard]
        assert sorted(flat) == sorted(every) and len(flat) == len(every)
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(utils.DataError, match="shard"):
            training.parse_shard(bad)
    with pytest.raises(utils.DataError, match="unknown ROI"):
        training.sweep_jobs(["lh"], ["FFA-9"])
    with pytest.raises(utils.DataError, match="hemisphere"):
        training.sweep_jobs(["left"], ["V1v"])


@pytest.mark.parametrize("method", ["cl", "reg"])
def test_measure_throughput_runs_with_bf16_autocast(method):
    out = training.measure_throughput(method, n_voxels=30, image_size=64, batch_size=4, steps=1, warmup=0,
                                    cpu_bf16=True, channels_last=True)
    assert out["train_images_per_s"] > 0 and out["inference_images_per_s"] > 0


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = models.build_model("cl", 30, "none").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, g = model(torch.randn(6, 3, 64, 64), torch.randn(6, 30))
        loss = models.contrastive_loss(f, g, 0.3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ddp_gloo_loss_and_gradients_equal_single_process(tmp_path):
    """2 CPU ranks (gloo) on an uneven global batch of 13: loss, gradients, BN statistics = one process."""
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(REPO / "tests" / "ddp_check.py"), str(out)],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["rows_per_rank"] == 7
    for case, r in report.items():
        if not isinstance(r, dict):
            continue
        if case.endswith("float64"):  # the algebra is exact: differences are float64 rounding
            assert r["loss_diff"] < 1e-10 and r["grad_max_abs_diff"] < 1e-9, case
            assert r["grad_max_rel_diff"] < 1e-10 and r["buffer_max_abs_diff"] < 1e-12, case
        else:                         # float32: summation order only
            assert r["loss_diff"] < 1e-5 and r["buffer_max_abs_diff"] < 1e-5, case
            assert r["grad_max_abs_diff"] < 1e-4 * r["grad_max_abs"], case
