"""Per-vertex results of one subject: whole-hemisphere arrays of each set's test r, chosen layer and challenge score
(NaN where nothing was fitted), and the subject's cortical maps drawn from them (cortical_maps.py)."""
from __future__ import annotations

import numpy as np

import cortical_maps
import encoding
import feature_sets as fsets
import utils

OVERLAP_RULE = ("A vertex can lie in ROIs of several families (e.g. FFA-1 and the ventral stream), each fitted on its "
                "own. r_<set>_by_family keeps every family's value (one row per ROI family); r_<set>, layer_<set> and "
                "score_<set> take the vertex's first fitted ROI in the challenge's family order (prf-visualrois, "
                "floc-bodies, floc-faces, floc-places, floc-words, streams): the functionally defined ROIs before the "
                "broad anatomical streams. Every set takes the same ROI at a vertex (roi: its index in rois; -1 none), "
                "so differences between sets compare fits of the same voxels. Within a family ROIs do not overlap.")


def vertex_arrays(voxel_r: dict, roi_indices: dict, feature_sets, layers: dict, layer_names, n_vertices: int,
                  noise_ceiling=None) -> dict:
    """One hemisphere's arrays: r_<set> and layer_<set> (index into layers) per vertex, r_<set>_by_family
    (families x vertices), score_<set> where a noise ceiling is known, and roi, rois, families, layers; where ROIs
    overlap, as OVERLAP_RULE says. voxel_r, layers: as results_utils.HemisphereResults; roi_indices: ROI -> vertices."""
    names, families, layer_names = list(utils.ROI_NAMES), list(utils.ROI_FAMILIES), list(layer_names)
    family_of = {roi: families.index(utils.ROI_FAMILY_OF[roi]) for roi in voxel_r}
    roi_by_family = np.full((len(families), n_vertices), -1, dtype=np.int16)
    for roi in voxel_r:
        roi_by_family[family_of[roi], roi_indices[roi]] = names.index(roi)
    fitted = roi_by_family >= 0
    first = np.argmax(fitted, axis=0)            # each vertex's first family with a fitted ROI
    vertices = np.arange(n_vertices)
    out = {"rois": np.array(names), "families": np.array(families), "layers": np.array(layer_names),
           "roi": np.where(fitted.any(0), roi_by_family[first, vertices], -1).astype(np.int16)}
    for k, s in enumerate(feature_sets):
        r_by_family = np.full((len(families), n_vertices), np.nan, dtype=np.float32)
        layer_by_family = np.full((len(families), n_vertices), np.nan, dtype=np.float32)
        for roi, r in voxel_r.items():
            r_by_family[family_of[roi], roi_indices[roi]] = r[k]
            layer = layers.get(s, {}).get(roi)
            if layer in layer_names:
                layer_by_family[family_of[roi], roi_indices[roi]] = layer_names.index(layer)
        out[f"r_{s}"] = r_by_family[first, vertices]    # all-NaN columns (no fitted ROI) stay NaN
        out[f"r_{s}_by_family"] = r_by_family
        out[f"layer_{s}"] = np.where(np.isfinite(out[f"r_{s}"]), layer_by_family[first, vertices], np.nan)
        if noise_ceiling is not None:
            out[f"score_{s}"] = encoding.challenge_score(out[f"r_{s}"], noise_ceiling).astype(np.float32)
    return out


def roi_masks(roi_indices: dict, n_vertices: int) -> dict:
    """ROI -> boolean mask over the hemisphere's vertices (the outlines of the maps)."""
    masks = {}
    for roi, idx in roi_indices.items():
        masks[roi] = np.zeros(n_vertices, dtype=bool)
        masks[roi][idx] = True
    return masks


def subject_maps(arrays: dict, fsaverage_masks: dict, masks: dict, map_sets, map_comparisons, surfaces,
                 noise_ceilings: dict):
    """(file name, figure) of each cortical map of one subject, drawn one at a time: test r, chosen layer and
    challenge score (noise ceiling known) of each set in map_sets, and a - b of each (a, b) in map_comparisons.
    arrays, fsaverage_masks, masks, noise_ceilings: per hemisphere (vertex_arrays, utils.load_fsaverage_mask,
    roi_masks, the subject's noise ceiling or None)."""
    hemis = list(arrays)
    common = {"roi_masks": masks, "surfaces": surfaces}

    def per_hemi(key):
        return {h: arrays[h][key] for h in hemis}

    def fitted(s):
        return all(f"r_{s}" in arrays[h] for h in hemis) and any(np.isfinite(arrays[h][f"r_{s}"]).any()
                                                                  for h in hemis)
    for s in (s for s in map_sets if fitted(s)):
        label = fsets.label(s)
        yield f"accuracy_{s}.png", cortical_maps.accuracy_map(per_hemi(f"r_{s}"), fsaverage_masks, label, **common)
        yield f"layer_{s}.png", cortical_maps.layer_map(per_hemi(f"layer_{s}"), fsaverage_masks,
                                                        arrays[hemis[0]]["layers"], label, **common)
        if all(noise_ceilings.get(h) is not None for h in hemis):
            yield f"score_{s}.png", cortical_maps.score_map(per_hemi(f"r_{s}"), noise_ceilings, fsaverage_masks,
                                                            label, **common)
    for a, b in ((a, b) for a, b in map_comparisons if fitted(a) and fitted(b)):
        yield f"difference_{a}_minus_{b}.png", cortical_maps.difference_map(
            per_hemi(f"r_{a}"), per_hemi(f"r_{b}"), fsaverage_masks, fsets.label(a), fsets.label(b), **common)
