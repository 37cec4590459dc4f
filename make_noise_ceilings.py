"""Turn NSD's per-vertex noise-ceiling SNR into the challenge-space noise ceilings that the results stages read.

Reads <nsd_dir>/nsddata_betas/ppdata/subjXX/fsaverage/betas_fithrf_GLMdenoise_RR/{lh,rh}.ncsnr.mgh (nibabel),
keeps the challenge vertices (the ones of the download's roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy, in
order: 163,842 fsaverage vertices in, one value per fMRI column out) and writes
<noise_ceiling_dir>/subjXX/{lh,rh}_noise_ceiling.npy as fractions NC = ncsnr^2 / (ncsnr^2 + 1/n), n the trials
averaged per image (Allen et al. 2022, NSD). Pass the same noise_ceiling_dir to generate_results.py and
predict_test_images.py.

n: the Algonauts 2023 organisers made the challenge's own noise ceilings (for its withheld test split) from the
same files with 1/n = (A/3 + B/2 + C/1) / (A + B + C), A, B, C the test images with 3, 2 and 1 trials
(GitHub gifale95/algonauts_2023, code/01_challenge_data_preparation/challenge_data_preparation.py). Here the
scored images come from the challenge's training split, whose betas average an image's trials in the subject's
training sessions (up to 3). n = 3 (the default) is right for images seen three times and gives the highest
ceiling, so the lowest score; where the images' trial counts are known (NSD's nsd_expdesign.mat), give the same
effective n = (A + B + C) / (A/3 + B/2 + C/1) per subject.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
data_dir = "algonauts_2023_challenge_data"  # Algonauts 2023 download (read only): roi_masks select the vertices
nsd_dir = "natural-scenes-dataset"          # NSD download (read only) holding nsddata_betas/ppdata/subjXX/fsaverage
noise_ceiling_dir = "noise_ceilings"        # output: subjXX/{lh,rh}_noise_ceiling.npy (generate_results' option)
subjects = []                               # subjects to convert; [] = every subject in data_dir
trials_per_image = [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]  # n of subjects 1..8 (effective n where counts vary)
# ---------------------------------------------------------------------
from pathlib import Path

import nibabel
import numpy as np

import options
import outputs
import paths
import utils

FSAVERAGE_VERTICES = 163842  # vertices per hemisphere of FreeSurfer's fsaverage surface


def ncsnr_path(nsd_root, subject: int, hemi: str) -> Path:
    return (Path(nsd_root) / "nsddata_betas" / "ppdata" / paths.subject_dir_name(subject) / "fsaverage"
            / "betas_fithrf_GLMdenoise_RR" / f"{hemi}.ncsnr.mgh")


def challenge_vertex_mask(paths: utils.SubjectPaths, hemi: str) -> tuple[np.ndarray, Path]:
    """The download's fsaverage-space 0/1 mask of the challenge vertices, validated, as booleans."""
    path = paths.roi_dir / f"{hemi}.all-vertices_fsaverage_space.npy"
    if not path.is_file():
        raise options.DataError(f"{path}: challenge vertex mask not found (the Algonauts 2023 download's "
                                f"roi_masks/{hemi}.all-vertices_fsaverage_space.npy)")
    try:
        mask = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise options.DataError(f"{path}: not a readable .npy array ({err})") from None
    if mask.shape != (FSAVERAGE_VERTICES,) or not np.isin(mask, (0, 1)).all():
        raise options.DataError(f"{path}: mask of shape {mask.shape} ({mask.dtype}); expected "
                                f"{FSAVERAGE_VERTICES} values of 0 or 1 (one per fsaverage vertex)")
    return mask.astype(bool), path


def read_ncsnr(path: Path) -> np.ndarray:
    """One hemisphere's per-vertex ncsnr from NSD's .mgh, validated as 163,842 values."""
    if not path.is_file():
        raise options.DataError(f"{path}: NSD ncsnr file not found (expected <nsd_dir>/nsddata_betas/ppdata/"
                                "subjXX/fsaverage/betas_fithrf_GLMdenoise_RR/{lh,rh}.ncsnr.mgh)")
    try:
        values = np.asarray(nibabel.load(path).get_fdata(dtype=np.float64))
    except (OSError, ValueError, TypeError, nibabel.filebasedimages.ImageFileError,
            nibabel.spatialimages.HeaderDataError) as err:  # a truncated, empty or foreign file
        message = " ".join(str(err).split())  # nibabel's messages span lines
        raise options.DataError(f"{path}: not a readable .mgh image ({type(err).__name__}: {message})") from None
    if values.size != FSAVERAGE_VERTICES:
        raise options.DataError(f"{path}: ncsnr of shape {values.shape}; expected {FSAVERAGE_VERTICES} values "
                                "(one per fsaverage vertex)")
    return values.reshape(-1)


def noise_ceiling(ncsnr: np.ndarray, n_trials: float) -> np.ndarray:
    """NC as a fraction of the variance of an n-trial average that the stimulus explains (NSD's formula)."""
    snr2 = ncsnr ** 2
    return snr2 / (snr2 + 1.0 / n_trials)


def subject_trials(subject: int) -> float:
    if not 1 <= subject <= len(trials_per_image):
        raise options.OptionsError(f"trials_per_image={trials_per_image}: no entry for subject {subject} "
                                   "(one per subject 1..8)")
    n = float(trials_per_image[subject - 1])
    if not np.isfinite(n) or n <= 0:
        raise options.OptionsError(f"trials_per_image={trials_per_image}: subject {subject} has {n}; expected a "
                                   "positive number of trials")
    return n


def challenge_noise_ceiling(subject: int, hemi: str) -> tuple[np.ndarray, Path]:
    """One subject's and hemisphere's NC over the challenge vertices, every input checked first."""
    paths = utils.find_subject(data_dir, subject)
    mask, mask_path = challenge_vertex_mask(paths, hemi)
    if paths.fmri[hemi].is_file():
        n_columns = utils.load_fmri(paths, hemi).shape[1]
        if n_columns != mask.sum():
            raise options.DataError(f"{mask_path}: {mask.sum()} challenge vertices, but {paths.fmri[hemi]} has "
                                    f"{n_columns} columns; expected one per vertex")
    source = ncsnr_path(nsd_dir, subject, hemi)
    ncsnr = read_ncsnr(source)[mask]
    bad = np.flatnonzero(~np.isfinite(ncsnr) | (ncsnr < 0))
    if bad.size:
        fsaverage_index = np.flatnonzero(mask)[bad[0]]
        raise options.DataError(f"{source}: ncsnr {ncsnr[bad[0]]} at challenge vertex {bad[0]} (fsaverage "
                                f"vertex {fsaverage_index}); expected finite values >= 0")
    return noise_ceiling(ncsnr, subject_trials(subject)).astype(np.float32), source


config = options.apply_options(globals())
subject_list = utils.resolve_subjects(data_dir, subjects)
# every subject and hemisphere is read and checked before anything is written
ceilings = {(s, h): challenge_noise_ceiling(s, h) for s in subject_list for h in utils.HEMISPHERES}

rows = []
for (subject, hemi), (nc, source) in ceilings.items():
    out_path = Path(noise_ceiling_dir) / paths.subject_dir_name(subject) / f"{hemi}_noise_ceiling.npy"
    outputs.save_npy(out_path, nc, config, subject=subject, hemisphere=hemi, ncsnr_file=str(source),
                     trials_per_image=subject_trials(subject))
    rows.append({"subject": subject, "hemisphere": hemi, "vertices": nc.size, "n": subject_trials(subject),
                 "median NC": float(np.median(nc)) if nc.size else float("nan"),
                 "mean NC": float(nc.mean()) if nc.size else float("nan")})

print(outputs.format_table(rows))
print(f"wrote noise ceilings of {len(subject_list)} subject(s) to {noise_ceiling_dir} "
      f"(pass --noise_ceiling_dir={noise_ceiling_dir} to generate_results.py)")
