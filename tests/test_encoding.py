"""Encoding core of results_utils: ridge vs sklearn, Pearson r vs scipy, ROI summaries, paired statistics."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge, RidgeCV

import encoding
import pca
import synthetic_data

GRID = np.logspace(-1, 4, 6)


@pytest.fixture(scope="module")
def data():
    return synthetic_data.make_synthetic_encoding_data(n_train=300, n_val=120, n_test=80, n_features=40, n_voxels=60,
                                                       rank=8, seed=3)


def sklearn_predictions(d, alpha, split="test"):
    model = Ridge(alpha=alpha).fit(d["X_train"].astype(np.float64), d["Y_train"].astype(np.float64))
    return model, model.predict(d[f"X_{split}"].astype(np.float64))


def scipy_r(y, p):
    return np.array([scipy.stats.pearsonr(y[:, j], p[:, j])[0] for j in range(y.shape[1])])


# ---- ridge ----


@pytest.mark.parametrize("alpha", [0.5, encoding.PAPER_ALPHA_UNTUNED, encoding.PAPER_ALPHA_TUNED])
def test_fixed_alpha_matches_sklearn_ridge(data, alpha):
    fit = encoding.fit_ridge(data["X_train"], data["Y_train"], alphas=alpha, device="cpu")
    model, expected = sklearn_predictions(data, alpha)
    np.testing.assert_allclose(fit.predict(data["X_test"]), expected, atol=1e-4)
    np.testing.assert_allclose(fit.coef_, model.coef_.T, atol=1e-4)
    np.testing.assert_allclose(fit.intercept_, model.intercept_, atol=1e-4)
    assert (fit.alphas_ == alpha).all() and fit.val_scores_ is None


def test_fixed_alpha_wide_features_matches_sklearn(data):
    """More features than train images: the eigenbasis comes from the n x n kernel."""
    X = np.random.default_rng(0).normal(size=(30, 200)).astype(np.float32)
    Y = data["Y_train"][:30]
    fit = encoding.fit_ridge(X, Y, alphas=5.0, device="cpu")
    model = Ridge(alpha=5.0).fit(X.astype(np.float64), Y.astype(np.float64))
    X_new = np.random.default_rng(1).normal(size=(10, 200))
    np.testing.assert_allclose(fit.predict(X_new), model.predict(X_new), atol=1e-4)


@pytest.mark.parametrize("n_val", [120, 25])  # n_val >= features (square R) and < features (trapezoidal R)
def test_per_voxel_alpha_matches_sklearn_reference(data, n_val):
    d = {**data, "X_val": data["X_val"][:n_val], "Y_val": data["Y_val"][:n_val]}
    fit = encoding.fit_ridge(d["X_train"], d["Y_train"], d["X_val"], d["Y_val"], alphas=GRID, device="cpu")
    # reference: one sklearn Ridge per alpha, val r by scipy, best alpha per voxel
    val_r, test_pred = [], []
    for alpha in GRID:
        _, val_pred = sklearn_predictions(d, alpha, "val")
        val_r.append(scipy_r(d["Y_val"].astype(np.float64), val_pred))
        test_pred.append(sklearn_predictions(d, alpha)[1])
    val_r, test_pred = np.array(val_r), np.array(test_pred)
    np.testing.assert_allclose(fit.val_scores_, val_r, atol=1e-4)
    best = val_r.argmax(0)
    # near-ties may break either way in float32: the chosen alpha must be a best one up to 1e-5 ...
    chosen = np.searchsorted(GRID, fit.alphas_)
    cols = np.arange(val_r.shape[1])
    assert (val_r[chosen, cols] >= val_r[best, cols] - 1e-5).all()
    assert (chosen == best).mean() >= 0.95
    assert len(np.unique(chosen)) >= 3  # the planted signal makes the choice vary across voxels
    # ... and the predictions are sklearn's for that alpha
    np.testing.assert_allclose(fit.predict(d["X_test"]), test_pred[chosen, :, cols].T, atol=1e-4)
    np.testing.assert_allclose(fit.best_val_scores_, val_r[chosen, cols], atol=1e-4)


def test_mse_selection_matches_sklearn_reference(data):
    fit = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], alphas=GRID,
                       score="mse", device="cpu")
    mse = np.array([((data["Y_val"] - sklearn_predictions(data, a, "val")[1]) ** 2).mean(0) for a in GRID])
    np.testing.assert_allclose(fit.val_scores_, mse, rtol=1e-4)
    chosen = np.searchsorted(GRID, fit.alphas_)
    cols = np.arange(mse.shape[1])
    assert (mse[chosen, cols] <= mse.min(0) * (1 + 1e-5)).all()


def test_given_voxel_alphas_match_ridgecv(data):
    """RidgeCV picks alphas by LOO on train; given those alphas our predictions equal its predictions."""
    X, Y = data["X_train"].astype(np.float64), data["Y_train"].astype(np.float64)
    ridge_cv = RidgeCV(alphas=GRID, alpha_per_target=True).fit(X, Y)
    assert len(np.unique(ridge_cv.alpha_)) >= 2
    fit = encoding.fit_ridge(X, Y, voxel_alphas=ridge_cv.alpha_, device="cpu")
    np.testing.assert_array_equal(fit.alphas_, ridge_cv.alpha_)
    np.testing.assert_allclose(fit.predict(data["X_test"]), ridge_cv.predict(data["X_test"]), atol=1e-4)


def test_float64_mode_and_chunking_agree(data):
    args = (data["X_train"], data["Y_train"], data["X_val"], data["Y_val"])
    a = encoding.fit_ridge(*args, alphas=GRID, device="cpu", dtype="float64", voxel_chunk=7)
    b = encoding.fit_ridge(*args, alphas=GRID, device="cpu")
    np.testing.assert_allclose(a.predict(data["X_test"]), b.predict(data["X_test"]), atol=1e-4)


def test_constant_val_voxel_gets_nan_scores_and_largest_alpha(data):
    Y_val = data["Y_val"].copy()
    Y_val[:, 5] = 0.1
    fit = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], Y_val, alphas=GRID, device="cpu")
    assert np.isnan(fit.val_scores_[:, 5]).all() and fit.alphas_[5] == GRID[-1]
    assert np.isfinite(np.delete(fit.val_scores_, 5, axis=1)).all()


def test_ridge_bad_input_is_a_value_error(data):
    Y = data["Y_train"].copy()
    Y[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        encoding.fit_ridge(data["X_train"], Y, alphas=1.0, device="cpu")
    with pytest.raises(ValueError, match="rows"):
        encoding.fit_ridge(data["X_train"][:-1], data["Y_train"], alphas=1.0, device="cpu")
    with pytest.raises(ValueError, match="validation"):
        encoding.fit_ridge(data["X_train"], data["Y_train"], alphas=GRID, device="cpu")


def test_val_norms_one_product_match_per_alpha_predictions():
    """|val predictions|^2 of all alphas from the stacked triangular blocks equal explicit ones."""
    rng = np.random.default_rng(6)
    for n_val, k in ((30, 12), (9, 12)):   # square R and trapezoidal R (fewer val images than features)
        A_val = rng.normal(size=(n_val, k))
        R = np.linalg.qr(A_val, mode="r")
        Z = rng.normal(size=(k, 7))
        D = 1.0 / (rng.uniform(1, 50, k)[None, :] + GRID[:, None])
        expected = np.array([((A_val @ (d[:, None] * Z)) ** 2).sum(0) for d in D])
        for n_blocks in (1, 3, 8):
            blocks = encoding._stacked_triangular_blocks(torch.as_tensor(R), torch.as_tensor(D), n_blocks)
            got = encoding._val_sq_norms([(lo, block.numpy()) for lo, block in blocks], Z, len(GRID))
            np.testing.assert_allclose(got, expected, rtol=1e-12)


def explicit_gcv(X, Y, alpha):
    """GCV from the explicit train hat matrix of ridge with an unpenalised intercept (numpy float64)."""
    n = X.shape[0]
    Xc = X - X.mean(0)
    H = np.full((n, n), 1.0 / n) + Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T)
    return H, n * ((Y - H @ Y) ** 2).sum(0) / (n - np.trace(H)) ** 2


@pytest.mark.parametrize("n_features", [15, 90])  # fewer and more features than train images
def test_gcv_matches_explicit_hat_matrix(n_features):
    rng = np.random.default_rng(7)
    n = 60
    X = rng.normal(size=(n, n_features)) * np.logspace(0, -1.5, n_features) + 2.0
    Y = X[:, :5] @ rng.normal(size=(5, 12)) * np.linspace(0, 1, 12) + rng.normal(size=(n, 12)) + 3.0
    Y[:, 4] = 0.7   # constant voxel: GCV undefined (every alpha fits it), so NaN and the largest alpha
    reference = []
    for alpha in GRID:
        H, gcv = explicit_gcv(X, Y, alpha)
        # the hat matrix is sklearn's fit: H y = Ridge(alpha).fit(X, y).predict(X)
        np.testing.assert_allclose(H @ Y, Ridge(alpha=alpha).fit(X, Y).predict(X), atol=1e-9)
        reference.append(gcv)
    reference = np.array(reference)
    ok = np.arange(12) != 4
    best = reference[:, ok].argmin(0)
    # scores are stored as float32 (rel. 6e-8); float32 products (rel. error ~1e-6) lose up to two
    # more digits where the fit explains most of |y_c|^2
    for dtype, rtol in (("float64", 1e-6), ("float32", 1e-4)):
        fit = encoding.fit_ridge(X, Y, alphas=GRID, selection="gcv", device="cpu", dtype=dtype)
        np.testing.assert_allclose(fit.gcv_scores_[:, ok], reference[:, ok], rtol=rtol)
        assert np.isnan(fit.gcv_scores_[:, 4]).all() and fit.alphas_[4] == GRID[-1]
        assert fit.val_scores_ is None and fit.selection == "gcv"
        np.testing.assert_array_equal(np.searchsorted(GRID, fit.alphas_[ok]), best)
        np.testing.assert_allclose(fit.best_gcv_scores_[ok], reference[best, np.flatnonzero(ok)], rtol=rtol)
    assert len(np.unique(best)) >= 2
    # coefficients at the chosen alphas are sklearn's
    for j in np.flatnonzero(ok):
        model = Ridge(alpha=fit.alphas_[j]).fit(X, Y[:, j])
        np.testing.assert_allclose(fit.coef_[:, j], model.coef_, atol=1e-4)


def test_selection_only_mode_then_refit_with_voxel_alphas(data):
    """Choose per voxel among candidate feature sets by val r without coefficients, refit the winners."""
    rng = np.random.default_rng(9)
    candidates = {"all": lambda x: x, "first half": lambda x: x[:, :20],
                  "mixed": lambda x: x @ rng.normal(size=(40, 25)).astype(np.float32)}
    feats = {name: {s: f(data[f"X_{s}"]) for s in ("train", "val", "test")} for name, f in candidates.items()}
    best_r, best_alpha = [], []
    for name, x in feats.items():
        sel = encoding.fit_ridge(x["train"], data["Y_train"], x["val"], data["Y_val"], alphas=GRID,
                                 compute_coef=False, device="cpu")
        full = encoding.fit_ridge(x["train"], data["Y_train"], x["val"], data["Y_val"], alphas=GRID, device="cpu")
        assert sel.coef_ is None and sel.intercept_ is None
        with pytest.raises(ValueError, match="compute_coef"):
            sel.predict(x["test"])
        np.testing.assert_array_equal(sel.alphas_, full.alphas_)
        np.testing.assert_array_equal(sel.best_val_scores_, full.best_val_scores_)
        best_r.append(sel.best_val_scores_)
        best_alpha.append(sel.alphas_)
    winner = np.argmax(best_r, axis=0)
    assert len(np.unique(winner)) >= 2
    y_fit = np.concatenate([data["Y_train"], data["Y_val"]])
    for c, x in enumerate(feats.values()):
        voxels = np.flatnonzero(winner == c)
        x_fit = np.concatenate([x["train"], x["val"]])
        refit = encoding.fit_ridge(x_fit, y_fit[:, voxels], voxel_alphas=best_alpha[c][voxels], device="cpu")
        for i, j in enumerate(voxels):
            model = Ridge(alpha=best_alpha[c][j]).fit(x_fit.astype(np.float64), y_fit[:, j].astype(np.float64))
            np.testing.assert_allclose(refit.predict(x["test"])[:, i], model.predict(x["test"]), atol=1e-4)


def test_selection_arguments_are_checked(data):
    with pytest.raises(ValueError, match="gcv"):
        encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], alphas=GRID,
                           selection="gcv", device="cpu")
    with pytest.raises(ValueError, match="selection"):
        encoding.fit_ridge(data["X_train"], data["Y_train"], alphas=GRID, selection="loo", device="cpu")


# ---- Pearson r ----


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_pearson_wide_input_uses_threads_and_matches_scipy():
    """float32, wide enough for threads; a column whose first rows sit far from its mean takes the exact path."""
    rng = np.random.default_rng(8)
    y = rng.normal(size=(40, 5000)).astype(np.float32)
    p = (y + rng.normal(size=y.shape)).astype(np.float32)
    y[:, 4321] = 3.0
    p[:4, 17] += 50.0  # with block_rows=4 the first block's mean is 3 standard deviations from the column's
    expected = scipy.stats.pearsonr(y.astype(np.float64), p.astype(np.float64), axis=0).statistic
    for r in (encoding.pearson_r(y, p), encoding.pearson_r(y, p, block_rows=4)):
        assert np.isnan(r[4321]) and np.isnan(r).sum() == 1
        # float32 data: products summed in float32 within blocks of rows, float64 across: ~1e-7 on r
        np.testing.assert_allclose(np.delete(r, 4321), np.delete(expected, 4321), atol=1e-6)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 30)) * 5 + 100
    p = y * 0.3 + rng.normal(size=(50, 30))
    expected = scipy_r(y, p)
    np.testing.assert_allclose(encoding.pearson_r(y, p), expected, atol=1e-12)
    np.testing.assert_allclose(encoding.pearson_r(y.astype(np.float32), p.astype(np.float32)), expected, atol=1e-6)
    np.testing.assert_allclose(encoding.pearson_r(y, p, block_rows=7), expected, atol=1e-12)
    assert encoding.pearson_r(y[:, 0], p[:, 0]) == pytest.approx(expected[0], abs=1e-12)
    assert np.isnan(encoding.pearson_r(y[:1], p[:1])).all()  # one row: no correlation


def test_constant_columns_give_nan_and_are_counted():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(20, 5))
    p = rng.normal(size=(20, 5))
    y[:, 1] = 0.1   # constant truth (its centred sum of squares is rounding noise, not 0)
    p[:, 3] = -2.0  # constant prediction
    for r in (encoding.pearson_r(y, p), encoding.pearson_r(y.astype(np.float32), p.astype(np.float32))):
        assert np.isnan(r[[1, 3]]).all() and np.isfinite(r[[0, 2, 4]]).all()


# ---- noise ceiling ----


def test_challenge_score_matches_a_plain_loop():
    """Algonauts 2023: negative r -> 0, then 100 r^2 / NC capped at 100; NC <= 0 or non-finite -> NaN."""
    rng = np.random.default_rng(0)
    r = np.concatenate([[0.5, -0.5, 0.3, 0.2, 0.9, np.nan, 0.0], rng.uniform(-1, 1, 200)])
    nc = np.concatenate([[0.5, 0.25, 0.0, np.nan, 0.25, 0.5, -0.1], rng.uniform(-0.05, 1, 200)])
    expected = np.empty_like(r)
    for i in range(r.size):
        if not np.isfinite(nc[i]) or nc[i] <= 0 or not np.isfinite(r[i]):
            expected[i] = np.nan
        else:
            expected[i] = min(100.0, 100.0 * max(r[i], 0.0) ** 2 / nc[i])
    out = encoding.challenge_score(r, nc)
    np.testing.assert_allclose(out, expected, rtol=1e-12, equal_nan=True)  # same float64 operations
    np.testing.assert_allclose(out[:5], [50.0, 0.0, np.nan, np.nan, 100.0], equal_nan=True)  # by hand
    assert np.nanmax(out) <= 100 and np.nanmin(out) >= 0
    with pytest.raises(ValueError, match="fraction"):
        encoding.challenge_score(r, nc * 100)
    with pytest.raises(ValueError, match="shape"):
        encoding.challenge_score(r, nc[:3])


# ---- PCA ----


def test_fit_pca_train_only_and_capped():
    rng = np.random.default_rng(5)
    X = (rng.normal(size=(80, 6)) @ rng.normal(size=(6, 300)) * 3 + rng.normal(size=(80, 300))).astype(np.float32)
    fitted = pca.fit(X[:60], n_components=1000, seed=0)
    # capped at the 60 train images; 60 centred rows have rank 59, the zero-variance direction is left out
    assert fitted.n_components_ == 59 and fitted.transform(X[60:]).shape == (20, 59)
    exact = PCA(n_components=6, svd_solver="full").fit(X[:60])
    np.testing.assert_allclose(fitted.explained_variance_[:6], exact.explained_variance_, rtol=1e-3)
    again = pca.fit(X[:60], n_components=5, seed=0).transform(X[60:])
    np.testing.assert_array_equal(again, pca.fit(X[:60], n_components=5, seed=0).transform(X[60:]))


def test_torch_pca_matches_sklearn_and_pca_arrays_round_trip():
    """The GPU PCA (run here on the CPU) against sklearn's; a saved PCA transforms like the fitted one."""
    rng = np.random.default_rng(6)
    X = (rng.normal(size=(200, 12)) @ rng.normal(size=(12, 400)) * np.logspace(0, -1, 400)
         + 0.05 * rng.normal(size=(200, 400))).astype(np.float32)
    ours = pca.TorchPCA(8, seed=0, device="cpu").fit(X[:150])
    reference = PCA(n_components=8, svd_solver="full").fit(X[:150])
    # well-separated spectrum: the randomized range finder recovers it to float32 precision
    np.testing.assert_allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-4)
    projected = reference.transform(X[150:])
    # components are recovered to ~1e-4 relative (randomized vs exact SVD), so scores to 1e-4 of their scale
    np.testing.assert_allclose(ours.transform(X[150:]), projected, atol=3e-4 * np.abs(projected).max())
    fitted = pca.fit(X[:150], 8, seed=0)
    restored = pca.from_arrays(pca.arrays(fitted))
    np.testing.assert_array_equal(restored.transform(X[150:]), fitted.transform(X[150:]))


def test_gram_pca_of_few_images_equals_sklearns_exact_pca():
    """Few images, wide layer: the Gram-matrix PCA against scikit-learn's exact (LAPACK SVD) PCA."""
    rng = np.random.default_rng(7)
    X = (rng.normal(size=(40, 8)) @ rng.normal(size=(8, 300)) + 0.1 * rng.normal(size=(40, 300))).astype(np.float64)
    ours = pca.fit(X[:30], n_components=1000)                     # capped at 30 images: the Gram path
    reference = PCA(n_components=29, svd_solver="full").fit(X[:30])         # 30 centred rows have rank 29
    assert ours.n_components_ == 29                                          # the zero-variance direction left out
    np.testing.assert_allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-8)
    # float64 throughout: agreement to ~1e-10 of the scores' scale on the well-conditioned leading components
    scale = np.abs(reference.transform(X[30:])).max()
    np.testing.assert_allclose(ours.transform(X[30:])[:, :8], reference.transform(X[30:])[:, :8], atol=1e-8 * scale)


@pytest.mark.parametrize("n, p", [(600, 1500), (900, 600)])  # wide: images' Gram; tall: features' Gram
def test_randomized_gram_pca_matches_sklearns_exact_pca(n, p):
    """Components a small fraction of the Gram matrix: randomized subspace iterations on it, against LAPACK's SVD;
    the train scores that come with the fit equal the fitted PCA's own transform of the train rows."""
    rng = np.random.default_rng(8)
    X = ((rng.normal(size=(n + 50, 60)) * np.logspace(0, -1.5, 60)) @ rng.normal(size=(60, p))
         + 0.02 * rng.normal(size=(n + 50, p))).astype(np.float32)
    k = 40
    assert k < pca.EXACT_FRACTION * min(n, p) and min(n, p) > pca.EXACT_BELOW    # the randomized path
    ours, scores = pca.fit_transform(X[:n].copy(), k, seed=0, overwrite_x=True)
    reference = PCA(n_components=k, svd_solver="full").fit(X[:n].astype(np.float64))
    # a spectrum decaying 30-fold over the 40 components: float32 Gram, 4 subspace iterations -> ~1e-4
    np.testing.assert_allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-3)
    projected = reference.transform(X[n:].astype(np.float64))
    leading = 20  # well separated from the 41st: components to ~1e-3 of the scores' scale
    np.testing.assert_allclose(ours.transform(X[n:])[:, :leading], projected[:, :leading],
                               atol=2e-3 * np.abs(projected).max())
    np.testing.assert_allclose(scores, ours.transform(X[:n]), atol=1e-4 * np.abs(scores).max())


def test_val_fold_scores_equal_a_fit_scored_on_each_fold_alone(data):
    folds = np.random.default_rng(3).permutation(np.arange(len(data["X_val"])) % 2)
    fit = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"], data["Y_val"], compute_coef=False,
                             val_folds=folds)
    assert fit.val_fold_scores_.shape == (2, len(encoding.ALPHAS), data["Y_train"].shape[1])
    for f in (0, 1):
        alone = encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"][folds == f],
                                   data["Y_val"][folds == f], compute_coef=False)
        # float32 matmuls over ~100 rows: r agrees to ~1e-6
        np.testing.assert_allclose(fit.val_fold_scores_[f], alone.val_scores_, atol=1e-5)
    # with folds, the whole split's scores come from the folds' sums (float32 products): r to ~1e-7
    np.testing.assert_allclose(fit.val_scores_, encoding.fit_ridge(data["X_train"], data["Y_train"], data["X_val"],
                                                                   data["Y_val"], compute_coef=False).val_scores_,
                               atol=2e-6)
