"""Shared fixtures: tiny synthetic datasets in the official Algonauts 2023 layout."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MPLBACKEND", "Agg")

import paths  # noqa: E402
import utils  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks on one thread: on a shared 2-core machine, OpenMP threads waiting for busy cores cost more
    than the work."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def default_settings(method: str, pooled: bool = False, **overrides):
    """The TrainSettings a training script runs with by default (read from its OPTIONS block), overridden."""
    import options
    import training
    defaults = options.script_defaults(REPO / f"{method}_model_training.py")
    return training.TrainSettings.from_options({**defaults, **overrides}, pooled)


def run_script(script: str, *args: str) -> str:
    """Run a pipeline script in this process (no interpreter and torch start-up per run); return its stdout.

    Scripts read their options from sys.argv, so it is set for the run; global state a script changes (torch
    threads, the excepthook) is restored. Error paths (exit status, one-line stderr) are tested in subprocesses.
    """
    import contextlib
    import io
    import runpy

    import torch
    saved = sys.argv, torch.get_num_threads(), sys.excepthook
    sys.argv = [str(REPO / script), *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv, threads, sys.excepthook = saved
        torch.set_num_threads(threads)
    return out.getvalue()


def write_mapping(path: Path, mapping: dict) -> None:
    """Write a mapping_<family>.npy the way the official download stores it (a pickled dict)."""
    np.save(path, np.array(mapping, dtype=object))


def make_tiny_dataset(root: Path, subjects=(1, 2), n_images: int = 48, n_vertices: int = 240,
                      image_size: int = 32, layout: str = "official", seed: int = 0,
                      signal_rois=("V1v", "FFA-1", "PPA"), n_test_images: int = 0) -> Path:
    """Write a tiny dataset: random PNGs, fMRI with a learnable signal in a few ROIs, small ROI masks
    (and n_test_images challenge test PNGs without fMRI, official layout).

    Each ROI of every family gets a block of n_vertices // 8 vertices (some ROIs left empty, as in real data);
    responses in signal_rois are linear in the mean colour of the image plus noise.
    """
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    for subject in subjects:
        s2 = paths.subject_dir_name(subject)
        if layout == "official":
            img_dir = root / s2 / "training_split" / "training_images"
            fmri_dir = root / s2 / "training_split" / "training_fmri"
            roi_dir = root / s2 / "roi_masks"
            fmri_name = {h: f"{h}_training_fmri.npy" for h in utils.HEMISPHERES}
        else:
            tag = f"Subj{subject}"
            img_dir = root / "training_images" / tag
            fmri_dir = root / "training_fmri" / tag
            roi_dir = root / "roi_masks" / tag
            fmri_name = {h: f"subj{subject}_{h}_training_fmri.npy" for h in utils.HEMISPHERES}
        for d in (img_dir, fmri_dir, roi_dir):
            d.mkdir(parents=True, exist_ok=True)
        images = rng.integers(0, 256, size=(n_images, image_size, image_size, 3), dtype=np.uint8)
        # blocky images so downsampling keeps the signal
        images = np.repeat(np.repeat(images[:, ::4, ::4], 4, axis=1), 4, axis=2)
        nsd = rng.choice(73000, size=n_images, replace=False)
        for i in range(n_images):
            Image.fromarray(images[i]).save(img_dir / f"train-{i + 1:04d}_nsd-{nsd[i] + 1:05d}.png")
        if n_test_images:
            test_dir = root / s2 / "test_split" / "test_images"
            test_dir.mkdir(parents=True, exist_ok=True)
            test_images = rng.integers(0, 256, (n_test_images, image_size // 4, image_size // 4, 3), np.uint8)
            for i, img in enumerate(np.repeat(np.repeat(test_images, 4, axis=1), 4, axis=2)):
                Image.fromarray(img).save(test_dir / f"test-{i + 1:04d}_nsd-{rng.integers(1, 73000):05d}.png")
        colour = images.reshape(n_images, -1, 3).mean(1) / 255.0  # n x 3
        for hemi in utils.HEMISPHERES:
            labels_by_family = {}
            empty = {"mTL-bodies", "mTL-faces", "aTL-faces", "mTL-words"}
            block = max(2, n_vertices // 8)
            for f, family in enumerate(utils.ROI_FAMILIES):
                labels = np.zeros(n_vertices, dtype=np.int64)
                for k, name in enumerate(utils.ROIS_BY_FAMILY[family]):
                    if name in empty:
                        continue
                    start = ((k + f) * block) % (n_vertices - block + 1)
                    labels[start:start + block] = k + 1
                labels_by_family[family] = labels
                np.save(roi_dir / f"{hemi}.{family}_challenge_space.npy", labels)
            fmri = rng.normal(size=(n_images, n_vertices)).astype(np.float32)
            for roi in signal_rois:
                fam = utils.ROI_FAMILY_OF[roi]
                idx = np.flatnonzero(labels_by_family[fam] == utils.ROIS_BY_FAMILY[fam].index(roi) + 1)
                weights = rng.normal(size=(3, len(idx)))
                fmri[:, idx] = 3.0 * (colour - colour.mean(0)) @ weights / colour.std() + 0.3 * fmri[:, idx]
            np.save(fmri_dir / fmri_name[hemi], fmri)
        for family in utils.ROI_FAMILIES:
            write_mapping(roi_dir / f"mapping_{family}.npy",
                          {0: "Unknown", **{i: n for i, n in enumerate(utils.ROIS_BY_FAMILY[family], start=1)}})
    return root
