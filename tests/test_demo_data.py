"""The bundled real ROI masks (mask_bundle), and the synthetic dataset (layout, determinism, planted signal)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import image_cache
import mask_bundle as bundle
import options
import outputs
import paths
import synthetic_data as demo
import synthetic_images
import utils

# Real vertex counts (lh, rh) of the subjects the tests generate.
REAL_VERTICES = {1: (19004, 20544), 6: (18978, 20220)}


def tiny_options(out_dir, **overrides) -> dict:
    opts = dict(out_dir=str(out_dir), subjects=[1, 6], n_train_images=40, n_test_images=2, image_px=64,
                shared_fraction=0.25, noise_level=1.0, imagefolder_per_class=2, imagefolder_px=32, seed=0,
                mask_source="", overwrite=False, workers=1)
    opts.update(overrides)
    return opts


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """One tiny generated dataset (subjects 1 and 6: different vertex counts), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo") / "demo_data"
    root, summary = demo.build(tiny_options(out, workers=2))
    assert summary is not None
    return root


def test_bundle_equals_real_masks():
    if not bundle.SHARED_MASKS.is_dir():
        pytest.skip(f"{bundle.SHARED_MASKS} not here (a fresh clone has no ../shared)")
    masks, mappings = bundle.load_mask_bundle()
    assert sorted(masks) == list(range(1, 9))
    for subject in range(1, 9):
        roi_dir = bundle.SHARED_MASKS / paths.subject_dir_name(subject)
        for family in utils.ROI_FAMILIES:
            assert mappings[subject][family] == utils.load_roi_mapping(roi_dir / f"mapping_{family}.npy")
            for hemi in utils.HEMISPHERES:
                original = np.load(roi_dir / f"{hemi}.{family}_challenge_space.npy", allow_pickle=False)
                bundled = masks[subject][hemi][family]
                assert bundled.dtype == np.int64 and bundled.shape == original.shape
                np.testing.assert_array_equal(bundled, original)
    assert masks[6]["lh"]["streams"].shape == (18978,) and masks[8]["rh"]["streams"].shape == (20530,)


def test_fsaverage_bundle_equals_real_masks():
    if not bundle.SHARED_MASKS.is_dir():
        pytest.skip(f"{bundle.SHARED_MASKS} not here (a fresh clone has no ../shared)")
    fsaverage = bundle.load_fsaverage_bundle()
    masks, _ = bundle.load_mask_bundle()
    assert sorted(fsaverage) == list(range(1, 9))
    for subject in range(1, 9):
        for hemi in utils.HEMISPHERES:
            path = bundle.SHARED_MASKS / paths.subject_dir_name(subject) / f"{hemi}.all-vertices_fsaverage_space.npy"
            original = np.load(path, allow_pickle=False)
            assert original.shape == (163842,) and fsaverage[subject][hemi].dtype == bool
            np.testing.assert_array_equal(fsaverage[subject][hemi], original == 1)
            assert original.sum() == len(masks[subject][hemi]["streams"])  # its ones are the challenge vertices


def test_bundle_is_small():
    files = [bundle.ASSETS_DIR / name for name in ("roi_masks.npz", "roi_mappings.json", "fsaverage_masks.npz")]
    assert sum(p.stat().st_size for p in files) / 1024 < 200  # KB


def test_write_roi_masks_official_layout(tmp_path):
    masks, mappings = bundle.load_mask_bundle(subjects=[6])
    bundle.write_roi_masks(masks, mappings, 6, tmp_path)
    for family in utils.ROI_FAMILIES:
        assert utils.load_roi_mapping(tmp_path / f"mapping_{family}.npy") == mappings[6][family]
        for hemi in utils.HEMISPHERES:
            written = np.load(tmp_path / f"{hemi}.{family}_challenge_space.npy", allow_pickle=False)
            assert written.dtype == np.int64
            np.testing.assert_array_equal(written, masks[6][hemi][family])
    paths = utils.SubjectPaths(6, "official", {}, tmp_path, None, tmp_path)
    roi_masks = utils.load_roi_masks(paths, "lh", 18978)
    assert set(roi_masks) == set(utils.ROI_NAMES)
    # an ROI that is empty in subject 6's left hemisphere stays empty, and the non-empty ones keep their sizes
    labels = masks[6]["lh"]["floc-faces"]
    for roi_id, name in mappings[6]["floc-faces"].items():
        if roi_id:
            assert roi_masks[name].sum() == (labels == roi_id).sum()


def test_mask_folder_round_trip(tmp_path):
    """save_mask_bundle -> load_mask_bundle reproduces what read_mask_folder read (int8 packing is lossless)."""
    masks, mappings = bundle.load_mask_bundle(subjects=[1, 6])
    for subject in (1, 6):
        roi_dir = tmp_path / "src" / paths.subject_dir_name(subject) / "roi_masks"
        bundle.write_roi_masks(masks, mappings, subject, roi_dir)
    read_masks, read_mappings = bundle.read_mask_folder(tmp_path / "src")
    bundle.save_mask_bundle(read_masks, read_mappings, tmp_path / "bundle")
    again_masks, again_mappings = bundle.load_mask_bundle(tmp_path / "bundle")
    assert again_mappings == mappings
    for subject in (1, 6):
        for hemi in utils.HEMISPHERES:
            for family in utils.ROI_FAMILIES:
                np.testing.assert_array_equal(again_masks[subject][hemi][family], masks[subject][hemi][family])
    with pytest.raises(options.DataError, match="subject"):
        bundle.load_mask_bundle(tmp_path / "bundle", subjects=[3])


def test_dataset_is_valid_official_layout(demo_root):
    assert (demo_root / ".complete").is_file()
    assert utils.list_subjects(demo_root) == [1, 6]
    for subject, (n_lh, n_rh) in REAL_VERTICES.items():
        paths = utils.find_subject(demo_root, subject)
        assert paths.layout == "official"
        info = utils.validate_subject(paths)
        assert info["n_images"] == 40 and info["n_vertices"] == {"lh": n_lh, "rh": n_rh}
        assert len(utils.list_images(paths.test_images)) == 2
        ids = utils.nsd_ids(info["images"])
        assert ids is not None and ids.min() >= 1 and ids.max() < 73000 and np.all(np.diff(ids) > 0)
        for hemi in utils.HEMISPHERES:
            fmri = np.load(paths.fmri[hemi], allow_pickle=False)
            assert fmri.dtype == np.float32
            np.testing.assert_allclose(fmri.mean(0), 0, atol=1e-4)
            np.testing.assert_allclose(fmri.std(0), 1, atol=1e-3)
            nc = utils.load_noise_ceiling(paths, hemi)
            assert nc.shape == (fmri.shape[1],) and np.all((nc >= 0) & (nc <= 1))
            assert outputs.sidecar_path(paths.fmri[hemi]).is_file()
        assert image_cache.decode_image(info["images"][0], 64).shape == (3, 64, 64)
        fsaverage = bundle.load_fsaverage_bundle(subjects=[subject])[subject]
        for hemi, n_vertices in zip(utils.HEMISPHERES, (n_lh, n_rh)):  # written as the download has them
            written = np.load(paths.fsaverage_mask_path(hemi), allow_pickle=False)
            assert written.dtype == np.int64 and written.shape == (163842,)
            np.testing.assert_array_equal(written, fsaverage[hemi].astype(np.int64))
            assert utils.load_fsaverage_mask(paths.fsaverage_mask_path(hemi), n_vertices).sum() == n_vertices
        with pytest.raises(options.DataError, match="expected 163842 zeros and ones, 100 ones"):
            utils.load_fsaverage_mask(paths.fsaverage_mask_path("lh"), 100)
    # like NSD: a quarter of the training images are seen by both subjects (the same PNG), the rest are distinct
    images = {s: utils.list_images(utils.find_subject(demo_root, s).train_images) for s in REAL_VERTICES}
    ids = {s: dict(zip(utils.nsd_ids(images[s]).tolist(), images[s])) for s in images}
    shared = set(ids[1]) & set(ids[6])
    assert len(shared) == 10
    nsd = next(iter(shared))
    assert ids[1][nsd].read_bytes() == ids[6][nsd].read_bytes()


def test_imagefolder_and_labels(demo_root):
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(demo_root / "imagefolder")
    assert folder.classes == sorted(synthetic_images.CATEGORIES) and len(folder) == 10
    assert folder[0][0].size == (32, 32)
    labels = json.loads((demo_root / "subj01" / "demo_labels.json").read_text())
    names = [p.name for p in utils.list_images(utils.find_subject(demo_root, 1).train_images)]
    assert labels["images"] == names and labels["categories"] == list(synthetic_images.CATEGORIES)
    area, present = np.array(labels["area"]), np.array(labels["present"])
    assert area.shape == present.shape == (40, 5) and np.array_equal(present, area > 0)
    assert present.any(axis=0).all()  # every category appears somewhere


def test_rerun_skips_and_refuses_foreign_folder(demo_root, tmp_path):
    fmri_file = demo_root / "subj01" / "training_split" / "training_fmri" / "lh_training_fmri.npy"
    before = fmri_file.stat().st_mtime_ns
    root, summary = demo.build(tiny_options(demo_root))
    assert summary is None and root == demo_root
    assert fmri_file.stat().st_mtime_ns == before
    foreign = tmp_path / "not_demo"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(options.DataError, match="overwrite"):
        demo.build(tiny_options(foreign))
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".not_demo.*"))  # no half-built folder left behind


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(demo, "simulate_fmri", fail)
    with pytest.raises(RuntimeError):
        demo.build(tiny_options(tmp_path / "demo_data", n_train_images=8, subjects=[1]))
    assert list(tmp_path.iterdir()) == []


def test_deterministic(demo_root, tmp_path):
    """Same seed -> identical fMRI and images (also with another number of workers); another seed differs."""
    again, _ = demo.build(tiny_options(tmp_path / "again", workers=1))
    other, _ = demo.build(tiny_options(tmp_path / "other", seed=1, subjects=[1], n_test_images=0,
                                       imagefolder_per_class=0))
    for hemi in utils.HEMISPHERES:
        first = utils.load_fmri(utils.find_subject(demo_root, 6), hemi)
        np.testing.assert_array_equal(first, utils.load_fmri(utils.find_subject(again, 6), hemi))
    png = sorted((demo_root / "subj01" / "training_split" / "training_images").iterdir())[3]
    assert png.read_bytes() == (again / "subj01" / "training_split" / "training_images" / png.name).read_bytes()
    a = utils.load_fmri(utils.find_subject(demo_root, 1), "lh")
    b = utils.load_fmri(utils.find_subject(other, 1), "lh")
    assert a.shape == b.shape and not np.array_equal(a, b)


def _roi_mean(root, subject, hemi, rois):
    paths = utils.find_subject(root, subject)
    fmri = np.asarray(utils.load_fmri(paths, hemi))
    masks = utils.load_roi_masks(paths, hemi, fmri.shape[1])
    return fmri[:, np.any([masks[r] for r in rois], axis=0)].mean(1)


@pytest.mark.parametrize("rois, category", [(("FFA-1", "OFA"), "faces"), (("PPA", "OPA"), "places"),
                                            (("EBA",), "bodies"), (("VWFA-1",), "words")])
def test_category_rois_prefer_their_category(demo_root, rois, category):
    labels = json.loads((demo_root / "subj01" / "demo_labels.json").read_text())
    has = np.array(labels["present"])[:, labels["categories"].index(category)].astype(bool)
    assert 5 <= has.sum() <= 35
    for hemi in utils.HEMISPHERES:
        response = _roi_mean(demo_root, 1, hemi, rois)
        assert response[has].mean() - response[~has].mean() > 0.3, (hemi, rois)


def test_early_rois_are_retinotopic(demo_root):
    """V1-V3 follow edge energy (Sobel, computed from the PNGs) in their visual-field quadrant: left hemisphere minus
    right follows right-half minus left-half energy; ventral (v) minus dorsal (d) areas follow upper minus lower."""
    from scipy import ndimage
    images = utils.list_images(utils.find_subject(demo_root, 1).train_images)
    gray = np.stack([image_cache.decode_image(p, 64).mean(0) for p in images]).astype(np.float64)
    energy = np.hypot(ndimage.sobel(gray, axis=1), ndimage.sobel(gray, axis=2))[:, 4:-4, 4:-4]  # 56 x 56, no border
    left, right = energy[:, :, :28].mean((1, 2)), energy[:, :, 28:].mean((1, 2))
    upper, lower = energy[:, :28].mean((1, 2)), energy[:, 28:].mean((1, 2))
    early = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d")
    lh_minus_rh = _roi_mean(demo_root, 1, "lh", early) - _roi_mean(demo_root, 1, "rh", early)
    assert np.corrcoef(lh_minus_rh, right - left)[0, 1] > 0.3
    ventral_minus_dorsal = sum(_roi_mean(demo_root, 1, hemi, ("V1v", "V2v", "V3v"))
                               - _roi_mean(demo_root, 1, hemi, ("V1d", "V2d", "V3d")) for hemi in utils.HEMISPHERES)
    assert np.corrcoef(ventral_minus_dorsal, upper - lower)[0, 1] > 0.3


def test_noise_ceiling_is_signal_variance_fraction():
    """With many images, corr(response, noiseless signal)^2 of each vertex matches its saved noise ceiling."""
    rng = np.random.default_rng(0)
    n_vertices = 200
    labels = {fam: np.zeros(n_vertices, np.int64) for fam in utils.ROI_FAMILIES}
    labels["prf-visualrois"][:50] = 1
    labels["floc-faces"][50:100] = 2
    labels["streams"][100:150] = 5
    mapping = {fam: {0: "Unknown", **dict(enumerate(utils.ROIS_BY_FAMILY[fam], 1))} for fam in utils.ROI_FAMILIES}
    tuning = demo.voxel_tuning(labels, mapping, "lh", rng)
    n_channels = demo.N_ORIENT + len(synthetic_images.CATEGORIES)
    features = rng.gamma(2.0, size=(3000, n_channels, synthetic_images.GRID ** 2)).astype(np.float32)
    for level in (1.0, 2.0):
        fmri, nc = demo.simulate_fmri(features, tuning, level, np.random.default_rng(1))
        signal = demo.voxel_signals(features, tuning)
        r2 = ((fmri * signal).mean(0) / (fmri.std(0) * signal.std(0))) ** 2
        assert np.abs(r2 - nc).max() < 0.06 and np.abs(r2 - nc).mean() < 0.015
        assert nc.dtype == np.float32 and fmri.dtype == np.float32
    np.testing.assert_allclose(demo.simulate_fmri(features, tuning, 0.0, rng)[1], 1.0)
    # early visual vertices are the most reliable, vertices in no ROI the least (as in NSD)
    assert tuning["nc0"][:50].mean() > tuning["nc0"][100:150].mean() > tuning["nc0"][150:].mean()
