"""Cortical maps: per-vertex challenge-space values drawn on the inflated fsaverage surface with ROI outlines.

Challenge space -> fsaverage through the download's {lh,rh}.all-vertices_fsaverage_space.npy; drawn with nilearn on
its bundled fsaverage5 (fsaverage's first 10,242 vertices, offline) or on the full fsaverage from a FreeSurfer folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import encoding
import options
import utils

FSAVERAGE5_VERTICES = 10242  # nilearn's fsaverage5: fsaverage's first 10,242 vertices (ico5)
VIEWS = ("lateral", "medial", "ventral", "posterior")
# (elevation, azimuth) of each view's camera (as nilearn's matplotlib views), per hemisphere
_CAMERA = {"lh": {"lateral": (0, 180), "medial": (0, 0), "ventral": (270, 0), "posterior": (0, 270)},
           "rh": {"lateral": (0, 0), "medial": (0, 180), "ventral": (270, 0), "posterior": (0, 270)}}
_NILEARN_HEMI = {"lh": "left", "rh": "right"}
# Outlined ROIs: one outline per label, drawn around the union of its challenge ROIs.
OUTLINES = {"V1": ("V1v", "V1d"), "V2": ("V2v", "V2d"), "V3": ("V3v", "V3d"), "hV4": ("hV4",), "EBA": ("EBA",),
            "FFA": ("FFA-1", "FFA-2"), "OPA": ("OPA",), "PPA": ("PPA",), "VWFA": ("VWFA-1", "VWFA-2")}
_OUTLINE_COLOURS = ("#ffffff", "#b0b0b0", "#606060", "#000000", "#1f77b4", "#d62728", "#2ca02c", "#17becf",
                    "#9467bd")


@dataclass
class Surfaces:
    """The meshes maps are drawn on (the first n_vertices of fsaverage's 163,842) and their sulcal shading."""
    name: str
    meshes: dict       # hemi -> nilearn mesh (coordinates, faces), inflated
    background: dict   # hemi -> per-vertex sulcal depth, or None
    n_vertices: int


def load_surfaces(fsaverage_dir=None) -> Surfaces:
    """nilearn's bundled fsaverage5 (fsaverage_dir None or ""), or the full fsaverage from a FreeSurfer folder.

    fsaverage_dir: FreeSurfer's subjects/fsaverage or its surf/ folder, with {lh,rh}.inflated (and {lh,rh}.sulc).
    """
    from nilearn import datasets, surface
    if not fsaverage_dir:
        meshes = datasets.load_fsaverage("fsaverage5")["inflated"].parts
        sulcal = datasets.load_fsaverage_data("fsaverage5", mesh_type="inflated", data_type="sulcal").data.parts
        # loaded into memory once: nilearn's file meshes are read from disk again at every use
        return Surfaces("fsaverage5", {h: surface.load_surf_mesh(meshes[_NILEARN_HEMI[h]]) for h in utils.HEMISPHERES},
                        {h: np.asarray(sulcal[_NILEARN_HEMI[h]]) for h in utils.HEMISPHERES}, FSAVERAGE5_VERTICES)
    folder = Path(fsaverage_dir)
    folder = folder / "surf" if (folder / "surf").is_dir() else folder
    meshes, background = {}, {}
    for hemi in utils.HEMISPHERES:
        path = folder / f"{hemi}.inflated"
        try:
            meshes[hemi] = surface.load_surf_mesh(str(path))
        except (OSError, ValueError) as err:
            raise options.DataError(f"{path}: not a readable FreeSurfer surface ({err}); expected fsaverage's "
                                    f"{hemi}.inflated in --fsaverage_dir") from None
        n = len(meshes[hemi].coordinates)
        if n != utils.FSAVERAGE_VERTICES:
            raise options.DataError(f"{path}: {n} vertices; expected fsaverage's {utils.FSAVERAGE_VERTICES}")
        sulc = folder / f"{hemi}.sulc"
        background[hemi] = np.asarray(surface.load_surf_data(str(sulc))) if sulc.is_file() else None
    return Surfaces(str(folder), meshes, background, utils.FSAVERAGE_VERTICES)


def facing_faces(mesh, elevation: float, azimuth: float):
    """The mesh with only the faces that face a camera at (elevation, azimuth): the others are hidden behind them.

    Halves what matplotlib draws; face orientation (outward or inward) is read from the mesh's signed volume.
    """
    from nilearn.surface import InMemoryMesh
    coords, faces = np.asarray(mesh.coordinates, dtype=np.float64), np.asarray(mesh.faces)
    a, b, c = coords[faces[:, 0]], coords[faces[:, 1]], coords[faces[:, 2]]
    normals = np.cross(b - a, c - a)
    outward = np.sign(np.einsum("ij,ij->", a - coords.mean(0), normals)) or 1.0
    el, az = np.radians(elevation), np.radians(azimuth)
    eye = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return InMemoryMesh(coords, faces[outward * (normals @ eye) > 0])


def vertex_array(pieces, n_vertices: int) -> np.ndarray:
    """Whole-hemisphere float32 per-vertex array, NaN outside the pieces.

    pieces: {key: (vertex indices, values)} (e.g. ROI -> its vertices and their r) or a list of such pairs;
    values may be one number for all the piece's vertices. Where pieces overlap, the later one wins.
    """
    out = np.full(n_vertices, np.nan, dtype=np.float32)
    for indices, values in (pieces.values() if isinstance(pieces, dict) else pieces):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n_vertices):
            raise options.DataError(f"vertex indices {indices.min()}..{indices.max()}: expected 0..{n_vertices - 1}")
        out[indices] = values
    return out


def to_fsaverage(values, fsaverage_mask) -> np.ndarray:
    """Challenge-space values (one per fMRI column) -> fsaverage's 163,842 vertices, NaN off the challenge space."""
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(fsaverage_mask, dtype=bool)
    if values.shape != (np.count_nonzero(mask),):
        raise options.DataError(f"per-vertex values of shape {values.shape}; expected ({np.count_nonzero(mask)},), "
                                "one per challenge vertex of the fsaverage mask")
    out = np.full(mask.shape, np.nan)
    out[mask] = values
    return out


def outline_masks(roi_masks: dict) -> dict:
    """{OUTLINES label: challenge-space bool mask of the union of its ROIs} from utils.load_roi_masks' masks."""
    return {label: np.any([roi_masks[r] for r in rois], axis=0) for label, rois in OUTLINES.items()
            if any(roi_masks[r].any() for r in rois)}


def draw_map(values: dict, fsaverage_masks: dict, *, title: str, units: str, cmap, vmin: float, vmax: float,
             roi_masks: dict | None = None, surfaces: Surfaces | None = None, categories=None):
    """One figure: a row of lateral, medial, ventral, posterior views per hemisphere, a colour bar, ROI outlines.

    values, fsaverage_masks, roi_masks: per hemi; values in challenge space (NaN = not fitted), roi_masks as from
    utils.load_roi_masks (outlined as OUTLINES). categories: names of the integer values 0..k-1 (a categorical map).
    """
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors
    from nilearn import plotting
    surfaces = surfaces or load_surfaces()
    hemis = [h for h in utils.HEMISPHERES if h in values]
    cmap = plt.get_cmap(cmap, len(categories)) if categories is not None else plt.get_cmap(cmap)
    fig = plt.figure(figsize=(11.5, 2.3 * len(hemis) + 1.2))
    grid = fig.add_gridspec(len(hemis), len(VIEWS) + 1, width_ratios=[1] * len(VIEWS) + [0.08], left=0.04,
                            right=0.93, top=1 - 0.85 / fig.get_figheight(), bottom=0.35 / fig.get_figheight(),
                            wspace=0.0, hspace=0.0)
    legend, drawn, total = {}, 0, 0
    for row, hemi in enumerate(hemis):
        on_mesh = to_fsaverage(values[hemi], fsaverage_masks[hemi])[:surfaces.n_vertices]
        drawn, total = drawn + np.count_nonzero(fsaverage_masks[hemi][:surfaces.n_vertices]), total + len(values[hemi])
        outlines = outline_masks(roi_masks[hemi]) if roi_masks else {}
        outline_on_mesh = {label: to_fsaverage(m, fsaverage_masks[hemi])[:surfaces.n_vertices] == 1
                           for label, m in outlines.items()}
        for col, view in enumerate(VIEWS):
            ax = fig.add_subplot(grid[row, col], projection="3d")
            mesh = facing_faces(surfaces.meshes[hemi], *_CAMERA[hemi][view])
            plotting.plot_surf_stat_map(
                mesh, on_mesh, bg_map=surfaces.background[hemi], hemi=_NILEARN_HEMI[hemi],
                view=_CAMERA[hemi][view], axes=ax, figure=fig, colorbar=False, cmap=cmap, vmin=vmin, vmax=vmax,
                symmetric_cbar=False, avg_method="median" if categories is not None else "mean")
            for label, mask in outline_on_mesh.items():
                colour = _OUTLINE_COLOURS[list(OUTLINES).index(label)]
                if (mask[mesh.faces].sum(1) >= 2).any():  # nilearn outlines regions, not lone vertices
                    plotting.plot_surf_contours(mesh, mask.astype(int), levels=[1], colors=[colour],
                                                axes=ax, figure=fig)
                    legend[label] = colour
            ax.set_box_aspect(None, zoom=1.35)
            if row == 0:
                ax.set_title(view, fontsize=10, pad=0)
            if col == 0:
                ax.text2D(-0.02, 0.5, hemi, transform=ax.transAxes, fontsize=11, rotation=90, va="center")
    cax = fig.add_subplot(grid[:, -1])
    norm = colors.Normalize(vmin, vmax)
    bar = fig.colorbar(cm.ScalarMappable(norm, cmap), cax=cax, label=units)
    if categories is not None:
        bar.set_ticks(np.arange(len(categories)), labels=list(categories))
    fig.suptitle(f"{title}\n{drawn:,} of {total:,} challenge vertices fall on {surfaces.name}", fontsize=11)
    if legend:
        from matplotlib.patches import Patch
        fig.legend(handles=[Patch(facecolor=legend[label], edgecolor="0.3", label=label) for label in OUTLINES
                            if label in legend],
                   loc="lower center", ncol=len(legend), fontsize=8, frameon=False, title="ROI outlines",
                   title_fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return fig


def _upper(arrays, q: float = 99.0) -> float:
    finite = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    finite = finite[np.isfinite(finite)]
    return float(np.percentile(np.abs(finite), q)) if finite.size else 1.0


def accuracy_map(r: dict, fsaverage_masks: dict, set_label: str, **kwargs):
    """Per-vertex test r of one feature set (per hemi, challenge space, NaN where not fitted)."""
    return draw_map(r, fsaverage_masks, title=f"test r: {set_label}", units="Pearson r (test images)",
                    cmap="inferno", vmin=0.0, vmax=max(_upper(r.values()), 1e-3), **kwargs)


def difference_map(a: dict, b: dict, fsaverage_masks: dict, label_a: str, label_b: str, **kwargs):
    """Per-vertex a - b (e.g. test r of CL minus untuned), diverging colours centred on 0."""
    diff = {h: np.asarray(a[h], dtype=np.float64) - np.asarray(b[h], dtype=np.float64) for h in a}
    top = max(_upper(diff.values()), 1e-3)
    return draw_map(diff, fsaverage_masks, title=f"{label_a} minus {label_b}",
                    units="difference in Pearson r (test images)", cmap="RdBu_r", vmin=-top, vmax=top, **kwargs)


def layer_map(layer_index: dict, fsaverage_masks: dict, layer_names, set_label: str = "", **kwargs):
    """The chosen layer per vertex (integer index into layer_names, NaN where not fitted), categorical colours."""
    names = list(layer_names)
    title = f"chosen layer: {set_label}" if set_label else "chosen layer"
    return draw_map(layer_index, fsaverage_masks, title=title, units="layer", cmap="viridis", vmin=-0.5,
                    vmax=len(names) - 0.5, categories=names, **kwargs)


def score_map(r: dict, noise_ceiling: dict, fsaverage_masks: dict, set_label: str, **kwargs):
    """The challenge score 100 max(r, 0)^2 / NC per vertex (encoding.challenge_score), given the noise ceiling."""
    score = {h: encoding.challenge_score(r[h], noise_ceiling[h]) for h in r}
    return draw_map(score, fsaverage_masks, title=f"challenge score: {set_label}",
                    units="% of the noise ceiling (100 r² / NC)", cmap="viridis", vmin=0.0, vmax=100.0, **kwargs)
