"""generate_voxel_roi_mappings.py on the real ROI masks of all eight subjects."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

import mask_bundle
import paths
import utils
from conftest import REPO


def _dataset_with_real_masks(root, n_images=3):
    """Official layout: the bundled real masks of subj01..08, tiny images and zero fMRI of the real width."""
    masks, mappings = mask_bundle.load_mask_bundle()
    for subject in sorted(masks):
        s2 = paths.subject_dir_name(subject)
        mask_bundle.write_roi_masks(masks, mappings, subject, root / s2 / "roi_masks")
        img_dir = root / s2 / "training_split" / "training_images"
        fmri_dir = root / s2 / "training_split" / "training_fmri"
        img_dir.mkdir(parents=True)
        fmri_dir.mkdir(parents=True)
        for i in range(n_images):
            Image.new("RGB", (8, 8), (i, i, i)).save(img_dir / f"train-{i + 1:04d}_nsd-{i + 1:05d}.png")
        for hemi in utils.HEMISPHERES:
            width = len(masks[subject][hemi]["streams"])
            np.save(fmri_dir / f"{hemi}_training_fmri.npy", np.zeros((n_images, width), dtype=np.float32))
    return masks, mappings


def _independent_lists(labels_by_family, mapping_by_family):
    """Per-vertex ROI lists by a plain loop over labelled vertices, family by family."""
    n = len(labels_by_family["streams"])
    lists = [[] for _ in range(n)]
    for family in utils.ROI_FAMILIES:
        labels = labels_by_family[family]
        for v in np.flatnonzero(labels):
            lists[v].append(mapping_by_family[family][int(labels[v])])
    return lists


def test_mappings_of_all_eight_real_subjects(tmp_path):
    masks, mappings = _dataset_with_real_masks(tmp_path / "data")
    assert sorted(masks) == list(range(1, 9))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "generate_voxel_roi_mappings.py"),
                           f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    widths = {1: (19004, 20544), 6: (18978, 20220), 8: (18981, 20530)}
    for subject in range(1, 9):
        folder = out / "voxel_roi_mappings" / paths.subject_dir_name(subject)
        for h, hemi in enumerate(utils.HEMISPHERES):
            got = json.loads((folder / f"{hemi}_voxel_roi_mappings.json").read_text())
            assert len(got) == widths.get(subject, widths[1])[h]
            assert got == _independent_lists(masks[subject][hemi], mappings[subject])
            indices = np.load(folder / f"{hemi}_roi_indices.npz")
            for name in utils.ROI_NAMES:
                expected = [v for v, rois in enumerate(got) if name in rois]
                np.testing.assert_array_equal(indices[name], expected)
    # Empty ROIs are reported, never a crash: subj01 lh has no FFA-2 (from the real masks).
    assert len(np.load(out / "voxel_roi_mappings" / "subj01" / "lh_roi_indices.npz")["FFA-2"]) == 0
    assert "empty" in proc.stdout
