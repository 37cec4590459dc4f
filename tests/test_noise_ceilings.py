"""make_noise_ceilings.py on synthetic NSD ncsnr files (.mgh written with nibabel) and a tiny challenge dataset."""
from __future__ import annotations

import subprocess
import sys

import nibabel
import numpy as np
import pytest

import options
import outputs
import paths
import utils
from conftest import REPO, make_tiny_dataset, run_script

FSAVERAGE = 163842
N_VERTICES = 80


def write_ncsnr(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.MGHImage(np.asarray(values, np.float32).reshape(-1, 1, 1), np.eye(4)), path)


@pytest.fixture
def nsd(tmp_path):
    """A challenge dataset of subjects 1 and 2 (80 vertices per hemisphere), their fsaverage masks and ncsnr."""
    rng = np.random.default_rng(0)
    data = make_tiny_dataset(tmp_path / "data", subjects=(1, 2), n_images=12, n_vertices=N_VERTICES)
    nsd_dir, truth = tmp_path / "nsd", {}
    for subject in (1, 2):
        for hemi in utils.HEMISPHERES:
            vertices = np.sort(rng.choice(FSAVERAGE, N_VERTICES, replace=False))
            mask = np.zeros(FSAVERAGE, dtype=np.int64)
            mask[vertices] = 1
            np.save(utils.find_subject(data, subject).roi_dir / f"{hemi}.all-vertices_fsaverage_space.npy", mask)
            ncsnr = rng.uniform(0, 1.5, FSAVERAGE)
            ncsnr[vertices[0] - 1] = np.nan     # NSD leaves some vertices outside the challenge space undefined
            ncsnr[vertices[5]] = 1.0            # NC = 1 / (1 + 1/n): 0.75 for n = 3
            write_ncsnr(nsd_dir / "nsddata_betas" / "ppdata" / paths.subject_dir_name(subject) / "fsaverage"
                        / "betas_fithrf_GLMdenoise_RR" / f"{hemi}.ncsnr.mgh", ncsnr)
            truth[subject, hemi] = vertices, ncsnr
    return data, nsd_dir, tmp_path / "nc", truth


def args(data, nsd_dir, out, *extra):
    return (f"--data_dir={data}", f"--nsd_dir={nsd_dir}", f"--noise_ceiling_dir={out}", *extra)


def test_noise_ceilings_from_ncsnr_are_read_by_the_results(nsd):
    data, nsd_dir, out, truth = nsd
    printed = run_script("make_noise_ceilings.py", *args(data, nsd_dir, out, "--trials_per_image=3,3,3,3,3,3,3,3",
                                                         "--subjects=1,2"))
    assert "wrote noise ceilings of 2 subject(s)" in printed
    for (subject, hemi), (vertices, ncsnr) in truth.items():
        nc = np.load(out / paths.subject_dir_name(subject) / f"{hemi}_noise_ceiling.npy")
        # independent form of ncsnr^2 / (ncsnr^2 + 1/n): 1 - 1 / (1 + n ncsnr^2), at the mask's ones in order
        expected = 1 - 1 / (1 + 3 * ncsnr[vertices].astype(np.float32).astype(np.float64) ** 2)
        np.testing.assert_allclose(nc, expected, rtol=1e-6, atol=1e-7)   # float32 files
        assert nc[5] == pytest.approx(0.75)
        assert outputs.sidecar_path(out / paths.subject_dir_name(subject) / f"{hemi}_noise_ceiling.npy").is_file()
        # the results' reader takes them as fractions of the subject's vertices
        loaded = utils.load_noise_ceiling(utils.find_subject(data, subject), hemi, N_VERTICES, out)
        np.testing.assert_allclose(loaded, nc)


def test_trials_per_image_is_per_subject(nsd):
    data, nsd_dir, out, truth = nsd
    run_script("make_noise_ceilings.py", *args(data, nsd_dir, out, "--trials_per_image=1,2.5,3,3,3,3,3,3"))
    for subject, n in ((1, 1.0), (2, 2.5)):
        vertices, ncsnr = truth[subject, "rh"]
        snr2 = ncsnr[vertices].astype(np.float32).astype(np.float64) ** 2
        np.testing.assert_allclose(np.load(out / paths.subject_dir_name(subject) / "rh_noise_ceiling.npy"),
                                   n * snr2 / (n * snr2 + 1), rtol=1e-6, atol=1e-7)
    with pytest.raises(options.OptionsError, match="subject 2 has -1.0"):
        run_script("make_noise_ceilings.py", *args(data, nsd_dir, out / "x", "--trials_per_image=3,-1"))
    with pytest.raises(options.OptionsError, match="no entry for subject 2"):
        run_script("make_noise_ceilings.py", *args(data, nsd_dir, out / "x", "--trials_per_image=3"))


def ncsnr_file(nsd_dir, subject, hemi):
    return (nsd_dir / "nsddata_betas" / "ppdata" / paths.subject_dir_name(subject) / "fsaverage"
            / "betas_fithrf_GLMdenoise_RR" / f"{hemi}.ncsnr.mgh")


@pytest.mark.parametrize("damage, message", [
    ("missing", "NSD ncsnr file not found"),
    ("short", f"expected {FSAVERAGE} values"),
    ("nan", "ncsnr nan at challenge vertex 7"),
    ("truncated", "not a readable .mgh image"),
])
def test_bad_ncsnr_is_a_one_line_error_naming_the_file_and_nothing_is_written(nsd, damage, message):
    data, nsd_dir, out, truth = nsd
    path = ncsnr_file(nsd_dir, 2, "rh")
    vertices, ncsnr = truth[2, "rh"]
    if damage == "missing":
        path.unlink()
    elif damage == "short":
        write_ncsnr(path, ncsnr[:-1])
    elif damage == "nan":
        write_ncsnr(path, np.where(np.arange(FSAVERAGE) == vertices[7], np.nan, ncsnr))
    else:
        path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(options.DataError, match=message) as err:
        run_script("make_noise_ceilings.py", *args(data, nsd_dir, out))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()     # subject 1 was fine, but every input is checked before writing


def test_mask_that_disagrees_with_the_fmri_is_an_error(nsd):
    data, nsd_dir, out, _ = nsd
    mask_path = utils.find_subject(data, 1).roi_dir / "lh.all-vertices_fsaverage_space.npy"
    mask = np.load(mask_path)
    mask[np.flatnonzero(mask == 0)[0]] = 1                  # 81 ones for 80 fMRI columns
    np.save(mask_path, mask)
    with pytest.raises(options.DataError, match="81 challenge vertices, but .* has 80 columns"):
        run_script("make_noise_ceilings.py", *args(data, nsd_dir, out))
    np.save(mask_path, mask[:-1])
    with pytest.raises(options.DataError, match=f"expected {FSAVERAGE} values of 0 or 1"):
        run_script("make_noise_ceilings.py", *args(data, nsd_dir, out))
    # from the command line: exit status 1, one line on stderr
    proc = subprocess.run([sys.executable, str(REPO / "make_noise_ceilings.py"), *args(data, nsd_dir, out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and str(mask_path) in proc.stderr
    assert not out.exists()
