"""Statistics over the right unit (significance.py) and user-supplied noise ceilings (utils.load_noise_ceiling)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

import options
import significance
import utils
from conftest import make_tiny_dataset


def loop_r(y, p):
    """Per-voxel Pearson r by a plain loop (NaN for a constant column), the independent reference."""
    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        if np.ptp(y[:, j]) > 0 and np.ptp(p[:, j]) > 0:
            out[j] = scipy.stats.pearsonr(y[:, j], p[:, j])[0]
    return out


def loop_diffs(y, a, b):
    """(mean, median) over voxels of r(y, a) minus those of r(y, b), NaN voxels left out."""
    r_a, r_b = loop_r(y, a), loop_r(y, b)
    return np.nanmean(r_a) - np.nanmean(r_b), np.nanmedian(r_a) - np.nanmedian(r_b)


def toy_predictions(n, v, seed, noise_a=0.8, noise_b=1.2):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, v))
    return y, y + noise_a * rng.normal(size=(n, v)), y + noise_b * rng.normal(size=(n, v))


# ---- noise ceilings from the user ----


@pytest.fixture
def one_subject(tmp_path):
    root = make_tiny_dataset(tmp_path / "data", subjects=(1,), n_images=12, n_vertices=80)
    return root, utils.find_subject(root, 1), tmp_path / "nc"


def write_nc(nc_dir, values_by_hemi):
    (nc_dir / "subj01").mkdir(parents=True, exist_ok=True)
    for hemi, values in values_by_hemi.items():
        np.save(nc_dir / "subj01" / f"{hemi}_noise_ceiling.npy", values)


def test_noise_ceiling_dir_percentages_become_fractions(one_subject, capsys):
    root, paths, nc_dir = one_subject
    fraction = np.linspace(0, 0.9, 80)
    write_nc(nc_dir, {"lh": fraction * 100, "rh": fraction})
    assert utils.load_noise_ceiling(paths, "lh") is None        # the challenge layout has none of its own
    lh = utils.load_noise_ceiling(paths, "lh", 80, nc_dir)
    assert "percentage" in capsys.readouterr().out
    np.testing.assert_allclose(lh, fraction, atol=1e-7)          # float32 storage of values <= 1
    subject = utils.load_subject(root, 1, noise_ceiling_dir=nc_dir)
    np.testing.assert_allclose(subject.noise_ceiling["lh"], fraction, atol=1e-7)
    np.testing.assert_allclose(subject.noise_ceiling["rh"], fraction, atol=1e-7)
    assert utils.load_subject(root, 1).noise_ceiling == {"lh": None, "rh": None}


@pytest.mark.parametrize("bad, message", [(np.full(79, 0.5), "1-D numeric array of 80"),
                                          (np.full((80, 1), 0.5), "1-D numeric array of 80"),
                                          (np.where(np.arange(80) == 17, np.nan, 0.5), "vertex 17"),
                                          (np.where(np.arange(80) == 3, -0.2, 0.5), "expected a fraction"),
                                          (np.full(80, 150.0), "expected a fraction")])
def test_bad_noise_ceiling_is_a_one_line_error_naming_the_file(one_subject, bad, message):
    root, paths, nc_dir = one_subject
    write_nc(nc_dir, {"lh": bad, "rh": np.full(80, 0.5)})
    for load in (lambda: utils.validate_subject(paths, noise_ceiling_dir=nc_dir),
                 lambda: utils.load_subject(root, 1, noise_ceiling_dir=nc_dir)):
        with pytest.raises(options.DataError, match=message) as err:
            load()
        assert str(nc_dir / "subj01" / "lh_noise_ceiling.npy") in str(err.value) and "\n" not in str(err.value)


def test_missing_noise_ceiling_file_in_the_given_dir(one_subject):
    _, paths, nc_dir = one_subject
    write_nc(nc_dir, {"lh": np.full(80, 0.5)})
    with pytest.raises(options.DataError, match="rh_noise_ceiling.npy: noise ceiling file not found"):
        utils.validate_subject(paths, noise_ceiling_dir=nc_dir)


# ---- within a subject: bootstrap and permutation over test images ----


def test_bootstrap_matches_a_loop_over_the_same_resamples():
    y, a, b = toy_predictions(40, 9, seed=1)
    b[:, 2] = 0.5  # a constant prediction: NaN r, left out of b's mean and median
    out = significance.bootstrap_r_diff(y, a, b, n_boot=50, seed=3, voxel_chunk=4)
    assert (out["mean_diff"], out["median_diff"]) == pytest.approx(loop_diffs(y, a, b), abs=1e-9)
    rows = significance.bootstrap_rows(40, 50, seed=3)
    for k in range(5):
        mean_k, median_k = loop_diffs(y[rows[k]], a[rows[k]], b[rows[k]])
        # r per resample is stored as float32: agreement to ~1e-7 of |r| <= 1
        assert out["mean_boot_diffs"][k] == pytest.approx(mean_k, abs=1e-6)
        assert out["median_boot_diffs"][k] == pytest.approx(median_k, abs=1e-6)
    for name in ("mean", "median"):
        diffs = out[f"{name}_boot_diffs"]
        assert out[f"{name}_ci_low"] == pytest.approx(np.percentile(diffs, 2.5))
        assert out[f"{name}_ci_low"] < out[f"{name}_diff"] < out[f"{name}_ci_high"]


def test_bootstrap_ci_of_one_set_matches_a_loop_over_the_same_resamples():
    y, a, b = toy_predictions(40, 9, seed=11)
    a[:, 4] = -1.0  # a constant prediction: NaN r, left out of the mean and median
    out = significance.bootstrap_r_ci(y, a, n_boot=60, seed=3, voxel_chunk=4)
    r = loop_r(y, a)
    assert (out["mean_r"], out["median_r"]) == pytest.approx((np.nanmean(r), np.nanmedian(r)), abs=1e-9)
    rows = significance.bootstrap_rows(40, 60, seed=3)
    loop = np.array([(np.nanmean(r_k), np.nanmedian(r_k)) for r_k in (loop_r(y[k], a[k]) for k in rows)])
    # r per resample is stored as float32: agreement to ~1e-7 of |r| <= 1
    np.testing.assert_allclose(out["mean_boot"], loop[:, 0], atol=1e-6)
    np.testing.assert_allclose(out["median_boot"], loop[:, 1], atol=1e-6)
    for j, name in enumerate(("mean", "median")):
        assert (out[f"{name}_ci_low"], out[f"{name}_ci_high"]) == pytest.approx(
            tuple(np.percentile(loop[:, j], [2.5, 97.5])), abs=1e-6)
        assert out[f"{name}_ci_low"] < out[f"{name}_r"] < out[f"{name}_ci_high"]
    # the same draws as the difference's bootstrap: its resampled differences are these minus b's
    diff = significance.bootstrap_r_diff(y, a, b, n_boot=60, seed=3)
    b_boot = significance.bootstrap_r_ci(y, b, n_boot=60, seed=3)
    np.testing.assert_allclose(diff["mean_boot_diffs"], out["mean_boot"] - b_boot["mean_boot"], atol=1e-6)


def zscored(m):
    """Each column z-scored over the rows (scipy), the permutation test's standardisation done independently."""
    return scipy.stats.zscore(m, axis=0)


def loop_null(y, a, b, masks):
    """(mean, median) r differences after swapping the z-scored predictions of each mask's test images."""
    za, zb = zscored(a), zscored(b)
    return np.array([loop_diffs(y, np.where(np.asarray(m)[:, None] == 1, zb, za),
                                np.where(np.asarray(m)[:, None] == 1, za, zb)) for m in masks])


def test_permutation_null_matches_a_loop_over_the_same_swaps():
    y, a, b = toy_predictions(30, 7, seed=2)
    b = 0.2 * b + 3.0   # another scale and offset: the standardised null must not see them
    out = significance.permutation_test_r_diff(y, a, b, n_permutations=40, seed=5, voxel_chunk=3)
    assert not out["exact"] and out["n_permutations"] == 40
    observed = loop_diffs(y, a, b)
    assert (out["mean_diff"], out["median_diff"]) == pytest.approx(observed, abs=1e-12)
    null = loop_null(y, a, b, significance.swap_masks(30, 40, seed=5, exact=False))
    np.testing.assert_allclose(out["null_mean_diffs"], null[:, 0], atol=1e-12)   # float64 throughout
    np.testing.assert_allclose(out["null_median_diffs"], null[:, 1], atol=1e-12)
    for j, name in enumerate(("mean", "median")):
        assert out[f"p_{name}"] == pytest.approx((1 + np.sum(np.abs(null[:, j]) >= abs(observed[j]))) / 41)


def test_exact_permutation_p_by_enumeration_and_random_swaps_approach_it():
    y, a, b = toy_predictions(8, 6, seed=4, noise_a=0.9, noise_b=1.1)
    observed = np.abs(loop_diffs(y, a, b))
    null = loop_null(y, a, b, itertools.product((0, 1), repeat=8))
    exact_p = (np.abs(null) >= observed - 1e-12).mean(0)       # all 256 swaps, the identity included
    out = significance.permutation_test_r_diff(y, a, b, n_permutations=1000)   # 2^8 <= 1000: exact
    assert out["exact"] and out["n_permutations"] == 256
    assert (out["p_mean"], out["p_median"]) == pytest.approx(tuple(exact_p), abs=1e-12)
    # random swaps estimate the same p: within 4 binomial standard errors of 4000 draws
    rand = significance.permutation_test_r_diff(y, a, b, n_permutations=4000, seed=1, exact=False)
    for p_exact, p_rand in zip(exact_p, (rand["p_mean"], rand["p_median"])):
        assert abs(p_rand - p_exact) < 4 * np.sqrt(p_exact * (1 - p_exact) / 4000) + 1 / 4000
    same = significance.permutation_test_r_diff(y, a, a.copy(), n_permutations=200, seed=0, exact=False)
    assert same["p_mean"] == 1 and same["p_median"] == 1           # no difference: nothing is less extreme
    y, a, b = toy_predictions(60, 20, seed=6, noise_a=0.5, noise_b=2.0)
    clear = significance.permutation_test_r_diff(y, a, b, n_permutations=200, seed=0)
    assert clear["p_mean"] == clear["p_median"] == pytest.approx(1 / 201)   # smallest p of 200 swaps


@pytest.fixture
def one_blas_thread():
    """Thousands of tiny matrix products: one BLAS thread beats several that wait for busy cores."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        yield


def rejection_rates(n_sims, noise_a, scale_b, seed):
    """Share of simulations with permutation p <= 0.05 (mean r, median r): 80 test images x 30 voxels, responses
    = signal + 1.5 x noise, predictions = signal + their own noise (b's: 1.0, times scale_b), 199 swaps."""
    p = np.empty((n_sims, 2))
    for s in range(n_sims):
        rng = np.random.default_rng([seed, s])
        signal = rng.normal(size=(80, 30))
        y = signal + 1.5 * rng.normal(size=(80, 30))
        a = signal + noise_a * rng.normal(size=(80, 30))
        b = scale_b * (signal + rng.normal(size=(80, 30)))
        out = significance.permutation_test_r_diff(y, a, b, n_permutations=199, seed=s)
        p[s] = out["p_mean"], out["p_median"]
    return (p <= 0.05).mean(0)


def test_permutation_type_one_error_holds_when_scales_differ(one_blas_thread):
    # H0 (equal noise) with b's predictions scaled by 0.2. 199 swaps make p <= 0.05 an exact 10/200 level; over
    # 2000 simulations its binomial SE is sqrt(0.05 * 0.95 / 2000) = 0.0049, so [0.03, 0.07] is +-4.1 SE.
    # Swapping unstandardised rows gave 0.005 (mean r) and 0.011 (median r) here: an inflated null.
    rates = rejection_rates(2000, noise_a=1.0, scale_b=0.2, seed=21)
    print("type-I error at 0.05 (mean r, median r):", rates)
    assert ((0.03 <= rates) & (rates <= 0.07)).all()


def test_permutation_power_does_not_depend_on_the_scale_of_predictions(one_blas_thread):
    # a's noise 25 % lower. Power near 0.83 (mean r) and 0.52 (median r) over 300 simulations: binomial SE
    # <= sqrt(0.25 / 300) = 0.029 each, so two estimates from independent draws would differ by < 3 x 0.041 =
    # 0.12; the scaled and unscaled runs share their draws, so they differ less. Unstandardised swaps lost
    # 0.47 (mean r: 0.81 -> 0.34) and 0.26 (median r: 0.51 -> 0.25) here.
    unscaled = rejection_rates(300, noise_a=0.75, scale_b=1.0, seed=22)
    scaled = rejection_rates(300, noise_a=0.75, scale_b=0.2, seed=22)
    print("power at 0.05 (mean r, median r): unscaled", unscaled, "b x 0.2", scaled)
    assert (unscaled > [0.7, 0.4]).all()                # enough power to lose
    assert (np.abs(scaled - unscaled) < 0.12).all()


# ---- across subjects ----


def test_across_subject_tests_match_scipy():
    rng = np.random.default_rng(7)
    rows = []
    for subject in range(1, 7):
        for roi in ("FFA-1", "V1v", "PPA"):
            for method, shift in (("cl", 0.02), ("untuned", 0.0)):
                value = 0.3 + shift + 0.03 * rng.normal()
                if roi == "PPA" and subject > 2 and method == "cl":
                    value = np.nan                                   # PPA: only 2 subjects with both
                rows.append({"subject": subject, "hemisphere": "lh", "roi": roi, "method": method,
                             "median_r": value})
    rows[0]["median_r"] = float("nan")                               # subject 1 FFA-1 cl: left out
    out = {r["roi"]: r for r in significance.across_subject_tests(rows, "median_r", "cl", "untuned")}
    for roi, first in (("FFA-1", 2), ("V1v", 1)):
        pick = lambda m: np.array([r["median_r"] for r in rows if r["roi"] == roi and r["method"] == m
                                   and r["subject"] >= first])
        a, b = pick("cl"), pick("untuned")
        t, w = scipy.stats.ttest_rel(a, b), scipy.stats.wilcoxon(a, b)
        res = out[roi]
        assert res["n_subjects"] == len(a) and res["mean_diff"] == pytest.approx(np.mean(a - b))
        assert (res["t"], res["p_t"], res["W"], res["p_w"]) == pytest.approx(
            (t.statistic, t.pvalue, w.statistic, w.pvalue))
    assert out["FFA-1"]["n_subjects"] == 5
    assert out["PPA"]["n_subjects"] == 2 and np.isnan(out["PPA"]["p_t"]) and np.isnan(out["PPA"]["p_w"])
    with pytest.raises(ValueError, match="two 'untuned' rows"):
        significance.across_subject_tests(rows + [dict(rows[1])], "median_r", "cl", "untuned")


# ---- FDR ----


def test_fdr_matches_scipy_and_ignores_nans():
    rng = np.random.default_rng(8)
    p = rng.uniform(0, 0.2, 12)
    p[[2, 9]] = np.nan
    q = significance.fdr_bh(p)
    finite = np.isfinite(p)
    np.testing.assert_allclose(q[finite], scipy.stats.false_discovery_control(p[finite], method="bh"))
    assert np.isnan(q[~finite]).all()
    rows = [{"hemisphere": h, "roi": f"r{i}", "p": p[i + 6 * (h == "rh")]} for h in ("lh", "rh") for i in range(6)]
    rows.append({"hemisphere": "lh", "roi": "empty", "note": "empty ROI"})
    out = significance.add_fdr_columns(rows, ["p"], family_keys=("hemisphere",))
    for hemi in ("lh", "rh"):
        ps = np.array([r["p"] for r in rows if r.get("hemisphere") == hemi and "p" in r])
        ok = np.isfinite(ps)
        expected = np.full(ps.shape, np.nan)
        expected[ok] = scipy.stats.false_discovery_control(ps[ok])
        np.testing.assert_allclose([r["p_fdr"] for r in out if r["hemisphere"] == hemi and "p" in r], expected)
    assert "p_fdr" not in out[-1] and "p_fdr" not in rows[0]        # copies; rows without p untouched


# ---- retrieval ----


def test_retrieval_matches_a_loop():
    rng = np.random.default_rng(9)
    images = rng.normal(size=(40, 5))
    fmri = images + 1.5 * rng.normal(size=(40, 5))
    out = significance.retrieval_accuracy(fmri, images, n_candidates=15, n_subsets=4, n_boot=200, seed=2)
    cos = lambda u, v: np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    for pool, subsets in (("subset", significance.candidate_subsets(40, 15, 4, seed=2)), ("all", [range(40)])):
        hits, total = {1: 0, 5: 0}, 0
        for subset in subsets:
            for i in subset:
                own = cos(fmri[i], images[i])
                better = sum(cos(fmri[i], images[j]) >= own for j in subset if j != i)
                total += 1
                for k in hits:
                    hits[k] += better < k
        for k in hits:
            assert out[f"top{k}_{pool}"] == pytest.approx(hits[k] / total)
            assert out[f"top{k}_{pool}_ci_low"] <= out[f"top{k}_{pool}"] <= out[f"top{k}_{pool}_ci_high"]
    assert out["n_candidates"] == 15 and out["chance_top1_subset"] == pytest.approx(1 / 15)
    few = significance.retrieval_accuracy(fmri[:12], images[:12], n_candidates=15, n_boot=10)
    assert few["n_candidates"] == 12 and few["top1_subset"] == few["top1_all"]   # fewer than 15: all images


def test_shuffled_fmri_control_sits_at_chance():
    rng = np.random.default_rng(10)
    n = 1000
    images = rng.normal(size=(n, 16))
    fmri = images + rng.normal(size=(n, 16))
    out = significance.retrieval_accuracy(fmri, images, n_boot=100, seed=0)
    for pool, size in (("subset", 300), ("all", n)):
        for k in (1, 5):
            chance = k / size
            se = np.sqrt(chance * (1 - chance) / n)   # binomial SE over the n queries (conservative for 'subset')
            assert abs(out[f"control_top{k}_{pool}"] - chance) < 4 * se
            assert out[f"top{k}_{pool}"] > chance + 10 * se                # the real pairing is far above chance
