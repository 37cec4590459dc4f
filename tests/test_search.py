"""The layer search: cross-fitted val halves against a plain loop, and a planted in-sample advantage that cannot move
the choice (as it moves a choice made on a hold-out of train)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

import encoding
import search

ALPHAS = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5]


def _r(y, p):
    yc, pc = y - y.mean(0), p - p.mean(0)
    return (yc * pc).sum(0) / np.sqrt((yc * yc).sum(0) * (pc * pc).sum(0))


def test_crossfit_matches_a_loop_over_halves_alphas_and_voxels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 12))
    y = x @ rng.normal(size=(12, 9)) + 3 * rng.normal(size=(160, 9))
    split = {"train": np.arange(100), "val": np.arange(100, 160)}
    halves = search.val_halves(60, seed=4)
    assert sorted(np.bincount(halves)) == [30, 30]
    scores = search.layer_roi_scores({"L": {"train": x[:100], "val": x[100:]}}, y, split,
                                     {"a": np.arange(9), "b": np.array([2, 5])}, ALPHAS, seed=4,
                                     statistic="mean", feature_scaling="none")
    # the same by hand: sklearn Ridge per alpha, r on each half, alpha chosen on one half and read on the other
    val_pred = np.stack([Ridge(alpha=a).fit(x[:100], y[:100]).predict(x[100:]) for a in ALPHAS])
    r = np.stack([[_r(y[100:][halves == h], p[halves == h]) for p in val_pred] for h in (0, 1)])  # half, alpha, voxel
    v = np.arange(9)
    crossfit = (r[1][r[0].argmax(0), v] + r[0][r[1].argmax(0), v]) / 2
    np.testing.assert_allclose(scores[0], [crossfit.mean(), crossfit[[2, 5]].mean()], atol=1e-5)


def test_a_planted_in_sample_advantage_cannot_move_the_choice():
    """Layer 'tuned' carries the same signal as 'honest' plus, on the train images only, a copy of the train
    responses' noise (what fine-tuning on those images can memorise). Chosen on a hold-out of train, that advantage
    pulls alphas to the grid's smallest and wins the layer; cross-fitted on val it moves neither."""
    rng = np.random.default_rng(1)
    n_train, n_val, n_vox = 300, 120, 40
    signal = rng.normal(size=(n_train + n_val, 20))
    y = signal @ rng.normal(size=(20, n_vox)) / 4 + rng.normal(size=(n_train + n_val, n_vox))
    split = {"train": np.arange(n_train), "val": np.arange(n_train, n_train + n_val)}
    honest = signal + 0.5 * rng.normal(size=signal.shape)
    memorised = np.zeros((n_train + n_val, n_vox))
    memorised[:n_train] = y[:n_train] - y[:n_train].mean(0)   # in-sample only: nothing of it on val images
    tuned = np.hstack([honest, memorised])
    rois = {"roi": np.arange(n_vox)}
    as_sets = {name: {"train": f[:n_train], "val": f[n_train:]} for name, f in (("honest", honest), ("tuned", tuned))}
    ours = search.layer_roi_scores(as_sets, y, split, rois, ALPHAS, seed=0, feature_scaling="none")[:, 0]
    plain = search.layer_roi_scores({"honest": as_sets["honest"], "tuned": {
        "train": np.hstack([honest[:n_train], np.zeros((n_train, n_vox))]), "val": tuned[n_train:]}}, y, split, rois,
        ALPHAS, seed=0, feature_scaling="none")[:, 0]
    # ours: the planted copy changes the tuned layer's score by little, and honest stays the choice
    assert ours[1] == pytest.approx(plain[1], abs=0.05) and ours.argmax() == 0
    # a choice on a hold-out of train (the former scheme, written out with sklearn): the plant wins it
    fit_rows, hold_rows = train_test_split(np.arange(n_train), test_size=0.1, random_state=0)
    holdout_r = {name: np.stack([_r(y[hold_rows], Ridge(alpha=a).fit(f[fit_rows], y[fit_rows]).predict(f[hold_rows]))
                                 for a in ALPHAS]) for name, f in (("honest", honest), ("tuned", tuned))}
    assert (holdout_r["tuned"].argmax(0) == 0).mean() > 0.9               # the smallest alpha, nearly everywhere
    assert np.median(holdout_r["tuned"].max(0)) > np.median(holdout_r["honest"].max(0)) + 0.3


def test_a_tuned_search_keeps_only_its_chosen_layers_features_and_pca(tmp_path):
    """Dropping the unchosen layers removes their feature files, PCAs and sidecars; the chosen layer (a name that
    prefixes no other: features.1 vs features.12) and temporary files are left."""
    import features
    import outputs
    import paths
    spec = "untuned:alexnet:none"
    cache = paths.feature_cache_dir(tmp_path, 1, features.backbone_spec_tag(spec))
    names = ["features.1_64px_pca10-a_train.npy", "features.1_64px_pca10-a_pca.npz",
             "features.12_64px_pca10-a_train.npy", "features.12_64px_pca10-a_pca.npz", ".features.12_raw.tmp.npy"]
    for name in names:
        outputs.save_npy(cache / name, np.zeros(2), {"seed": 0}) if name.endswith(".npy") and not name.startswith(".") else \
            (cache / name).write_bytes(b"x")
    features.drop_cached_layers(tmp_path, 1, spec, keep={"features.1"})
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == sorted(names[:2] + names[4:])
    assert [p.name for p in (cache / "meta").iterdir()] == ["features.1_64px_pca10-a_train.npy.json"]
