"""cortical_maps.py: challenge space -> fsaverage in the right vertex order, the helpers, one rendered map."""
from __future__ import annotations

import numpy as np
import pytest

import cortical_maps
import mask_bundle
import options
import outputs
import utils

N5 = cortical_maps.FSAVERAGE5_VERTICES


@pytest.fixture(scope="module")
def subject1():
    """Subject 1's bundled fsaverage masks and ROI masks ({hemi: {ROI: bool over challenge vertices}})."""
    masks, mappings = mask_bundle.load_mask_bundle(subjects=[1])
    fsaverage = mask_bundle.load_fsaverage_bundle(subjects=[1])[1]
    rois = {hemi: {name: masks[1][hemi][family] == roi_id for family in utils.ROI_FAMILIES
                   for roi_id, name in mappings[1][family].items() if roi_id}
            for hemi in utils.HEMISPHERES}
    return fsaverage, rois


@pytest.fixture(scope="module")
def fsaverage5():
    from nilearn import datasets
    return datasets.load_fsaverage("fsaverage5")


def _v1_centre(v1_values, fsaverage_mask, pial_xyz):
    """Mean pial position of the fsaverage5 vertices that V1's values land on."""
    on_mesh = cortical_maps.to_fsaverage(v1_values, fsaverage_mask)[:N5]
    return pial_xyz[on_mesh == 1].mean(0)


def test_challenge_vertices_land_on_occipital_cortex_in_order(subject1, fsaverage5):
    """Checked by hand on subject 1 lh (nilearn's fsaverage5 pial): challenge vertices y ~ -75 mm (all: -22),
    V1 y ~ -99 mm (the most posterior 1 %) and x ~ -12 mm (medial); a reversed or shuffled order fails."""
    fsaverage, rois = subject1
    xyz = np.asarray(fsaverage5["pial"].parts["left"].coordinates, dtype=np.float64)
    mask = fsaverage["lh"]
    assert len(xyz) == N5 and mask.sum() == 19004
    on_mesh = mask[:N5]
    assert on_mesh.sum() == 1186
    assert abs(xyz[:, 1].mean() - (-22)) < 2 and abs(xyz[on_mesh, 1].mean() - (-75)) < 3
    v1 = (rois["lh"]["V1v"] | rois["lh"]["V1d"]).astype(float)
    x, y, _ = _v1_centre(v1, mask, xyz)
    assert abs(y - (-99)) < 3 and abs(x - (-12)) < 3
    assert np.mean(xyz[:, 1] <= y) < 0.015  # among the most posterior 1 %
    for wrong in (v1[::-1], np.random.default_rng(0).permutation(v1)):
        x, y, _ = _v1_centre(wrong, mask, xyz)
        assert not (abs(y - (-99)) < 3 and abs(x - (-12)) < 3)


def test_vertex_array_and_to_fsaverage():
    got = cortical_maps.vertex_array({"A": ([0, 2], [0.1, 0.2]), "B": ([2, 3], 0.5)}, 5)
    np.testing.assert_array_equal(got, np.array([0.1, np.nan, 0.5, 0.5, np.nan], dtype=np.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(cortical_maps.vertex_array([([4], [7.0])], 5), [np.nan] * 4 + [7.0])
    with pytest.raises(options.DataError, match="0..4"):
        cortical_maps.vertex_array([([5], 1.0)], 5)
    mask = np.array([0, 1, 1, 0, 1], dtype=bool)
    np.testing.assert_array_equal(cortical_maps.to_fsaverage([1.0, 2.0, 3.0], mask), [np.nan, 1, 2, np.nan, 3])
    with pytest.raises(options.DataError, match=r"expected \(3,\)"):
        cortical_maps.to_fsaverage([1.0, 2.0], mask)


def test_facing_faces_keeps_the_near_half_of_a_sphere(fsaverage5):
    """On a sphere, the faces that face a camera on the +x axis are those with centroid x > 0 (the same for -z)."""
    sphere = fsaverage5["sphere"].parts["left"]
    xyz, faces = np.asarray(sphere.coordinates, dtype=np.float64), np.asarray(sphere.faces)
    centroids = xyz[faces].mean(1) - xyz.mean(0)

    def key(f):  # one int64 per face
        f = np.asarray(f, dtype=np.int64)
        return (f[:, 0] * N5 + f[:, 1]) * N5 + f[:, 2]
    for (elevation, azimuth), axis, sign in (((0, 0), 0, 1), ((270, 0), 2, -1)):
        kept = np.isin(key(faces), key(cortical_maps.facing_faces(sphere, elevation, azimuth).faces))
        expected = sign * centroids[:, axis] > 0
        assert 0.45 < kept.mean() < 0.55 and np.mean(kept != expected) < 0.01


def test_accuracy_map_renders_one_readable_figure(subject1, tmp_path):
    from PIL import Image
    fsaverage, rois = subject1
    r = {}
    for hemi in utils.HEMISPHERES:  # 0.8 in V1, 0.2 in the other ROIs, NaN outside every ROI (not fitted)
        in_roi = np.any(list(rois[hemi].values()), axis=0)
        r[hemi] = np.where(rois[hemi]["V1v"] | rois[hemi]["V1d"], 0.8, np.where(in_roi, 0.2, np.nan))
    surfaces = cortical_maps.load_surfaces()
    fig = cortical_maps.accuracy_map(r, fsaverage, "CL-tuned", roi_masks=rois, surfaces=surfaces)
    assert len(fig.axes) == 2 * len(cortical_maps.VIEWS) + 1
    assert fig.axes[-1].get_ylabel() == "Pearson r (test images)" and fig.axes[-1].get_ylim() == (0.0, 0.8)
    path = outputs.save_figure(tmp_path / "map.png", fig)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert 1000 <= image.shape[1] <= 3000
    import matplotlib
    top = np.array(matplotlib.colormaps["inferno"](1.0)[:3]) * 255  # V1's colour: drawn on the surface
    assert (np.abs(image - top).sum(-1) < 30).sum() > 200


def test_difference_layer_and_score_scales(subject1):
    fsaverage, rois = subject1
    rng = np.random.default_rng(0)
    n = {h: int(fsaverage[h].sum()) for h in utils.HEMISPHERES}
    a = {h: rng.normal(0.3, 0.1, n[h]) for h in n}
    b = {h: rng.normal(0.2, 0.1, n[h]) for h in n}
    surfaces = cortical_maps.load_surfaces()
    fig = cortical_maps.difference_map(a, b, fsaverage, "CL", "untuned", surfaces=surfaces)
    top = np.percentile(np.abs(np.concatenate([a[h] - b[h] for h in n])), 99)
    np.testing.assert_allclose(fig.axes[-1].get_ylim(), (-top, top), rtol=1e-6)
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    fig = cortical_maps.layer_map({h: rng.integers(0, 8, n[h]).astype(float) for h in n}, fsaverage, layers,
                                  surfaces=surfaces)
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == layers
    np.testing.assert_allclose(bar.get_yticks(), np.arange(8))
    fig = cortical_maps.score_map(a, {h: np.full(n[h], 0.5) for h in n}, fsaverage, "CL", surfaces=surfaces)
    assert fig.axes[-1].get_ylim() == (0.0, 100.0) and "noise ceiling" in fig.axes[-1].get_ylabel()


@pytest.mark.filterwarnings("ignore:No volume information", "ignore:Unknown extension code")  # files written here
def test_full_fsaverage_from_a_freesurfer_folder(subject1, fsaverage5, tmp_path):
    """FreeSurfer {lh,rh}.inflated (and .sulc) of 163,842 vertices are read; another vertex count is one line."""
    import nibabel.freesurfer as fs_io
    fsaverage, _ = subject1
    surf = tmp_path / "fsaverage" / "surf"
    surf.mkdir(parents=True)
    for hemi, part in (("lh", "left"), ("rh", "right")):
        mesh = fsaverage5["inflated"].parts[part]
        xyz = np.asarray(mesh.coordinates, dtype=np.float64)
        # fsaverage5's faces over 163,842 vertices (the rest unused): drawn as fast as fsaverage5
        padded = np.vstack([xyz, np.repeat(xyz[:1], utils.FSAVERAGE_VERTICES - N5, axis=0)])
        fs_io.write_geometry(str(surf / f"{hemi}.inflated"), padded, np.asarray(mesh.faces, dtype=np.int32))
    fs_io.write_morph_data(str(surf / "lh.sulc"), np.linspace(-1, 1, utils.FSAVERAGE_VERTICES).astype(np.float32))
    surfaces = cortical_maps.load_surfaces(tmp_path / "fsaverage")
    assert surfaces.n_vertices == utils.FSAVERAGE_VERTICES and surfaces.background["rh"] is None
    assert surfaces.background["lh"].shape == (utils.FSAVERAGE_VERTICES,)
    values = {"lh": np.linspace(0, 1, int(fsaverage["lh"].sum()))}
    fig = cortical_maps.accuracy_map(values, fsaverage, "CL", surfaces=surfaces)
    assert "19,004 of 19,004 challenge vertices" in fig._suptitle.get_text()
    fs_io.write_geometry(str(surf / "rh.inflated"), np.asarray(fsaverage5["inflated"].parts["right"].coordinates),
                         np.asarray(fsaverage5["inflated"].parts["right"].faces, dtype=np.int32))
    with pytest.raises(options.DataError, match="10242 vertices; expected fsaverage's 163842"):
        cortical_maps.load_surfaces(surf)
