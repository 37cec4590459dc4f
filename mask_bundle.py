"""The bundled compressed copy of the real Algonauts 2023 ROI masks and fsaverage vertex masks (demo_assets/).

Read a folder of real masks, save or load the bundle, write one subject's masks in the official layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import options
import outputs
import paths
import utils

ASSETS_DIR = Path(__file__).resolve().parent / "demo_assets"  # bundled copy of the real ROI masks
SHARED_MASKS = Path(__file__).resolve().parent.parent / "shared" / "algonauts_roi_masks"  # the originals, if here
FSAVERAGE_BUNDLE = "fsaverage_masks.npz"  # packed 0/1 bits of {lh,rh}.all-vertices_fsaverage_space.npy


def _subject_mask_dir(source: Path, subject: int) -> Path:
    """A subject's mask folder in a mask-only tree (subjXX/) or a full download (subjXX/roi_masks/)."""
    subject_dir = source / paths.subject_dir_name(subject)
    return subject_dir / "roi_masks" if (subject_dir / "roi_masks").is_dir() else subject_dir


def _folder_subjects(source: Path, subjects) -> list[int]:
    if not source.is_dir():
        raise options.DataError(f"{source}: mask folder not found; expected subj01.. folders of "
                                "{lh,rh}.<family>_challenge_space.npy and mapping_<family>.npy files")
    if subjects is None:
        subjects = sorted(int(p.name[4:]) for p in source.iterdir() if p.name[:4] == "subj" and p.name[4:].isdigit())
    if not subjects:
        raise options.DataError(f"{source}: no subjXX mask folders found")
    return list(subjects)


def read_mask_folder(source, subjects=None):
    """Real masks from a folder of subjXX mask folders (or a full download).

    Returns ({subject: {hemi: {family: int64 labels}}}, {subject: {family: {id: name}}}).
    """
    source = Path(source)
    masks, mappings = {}, {}
    for subject in _folder_subjects(source, subjects):
        roi_dir = _subject_mask_dir(source, subject)
        mappings[subject] = {fam: utils.load_roi_mapping(roi_dir / f"mapping_{fam}.npy")
                             for fam in utils.ROI_FAMILIES}
        masks[subject] = {}
        for hemi in utils.HEMISPHERES:
            masks[subject][hemi] = {}
            for family in utils.ROI_FAMILIES:
                path = roi_dir / f"{hemi}.{family}_challenge_space.npy"
                if not path.is_file():
                    raise options.DataError(f"{path}: ROI mask file not found")
                labels = np.load(path, allow_pickle=False)
                if labels.ndim != 1 or not np.array_equal(labels, np.rint(labels)):
                    raise options.DataError(f"{path}: expected a 1-D array of integer ROI labels")
                masks[subject][hemi][family] = labels.astype(np.int64)
            lengths = {len(v) for v in masks[subject][hemi].values()}
            if len(lengths) != 1:
                raise options.DataError(f"{roi_dir}: {hemi} masks of different lengths {sorted(lengths)}; expected "
                                        "one vertex count per hemisphere")
    return masks, mappings


def read_fsaverage_masks(source, subjects=None) -> dict:
    """{subject: {hemi: bool fsaverage mask}} from the {lh,rh}.all-vertices_fsaverage_space.npy of a mask folder."""
    source = Path(source)
    found = {}
    for subject in _folder_subjects(source, subjects):
        roi_dir = _subject_mask_dir(source, subject)
        found[subject] = {hemi: utils.load_fsaverage_mask(roi_dir / utils.FSAVERAGE_MASK.format(hemi=hemi))
                          for hemi in utils.HEMISPHERES}
    return found


def save_mask_bundle(masks, mappings, bundle_dir=ASSETS_DIR, config=None) -> tuple[Path, Path]:
    """Write masks as int8 arrays in roi_masks.npz (keys 'subj01/lh.floc-faces') and the mappings as JSON."""
    bundle_dir = Path(bundle_dir)
    arrays = {}
    for subject, by_hemi in masks.items():
        for hemi, by_family in by_hemi.items():
            for family, labels in by_family.items():
                if labels.min(initial=0) < -128 or labels.max(initial=0) > 127:
                    raise options.DataError(f"subject {subject} {hemi}.{family}: labels outside int8 range")
                arrays[f"{paths.subject_dir_name(subject)}/{hemi}.{family}"] = labels.astype(np.int8)
    as_json = {s: {fam: {str(k): v for k, v in m.items()} for fam, m in by_fam.items()}
               for s, by_fam in mappings.items()}
    common = next(iter(as_json.values()))
    # One family -> {id: name} table when every subject has the same mappings (they do), else one per subject.
    table = common if all(m == common for m in as_json.values()) else {
        paths.subject_dir_name(s): m for s, m in as_json.items()}
    npz_path = outputs.save_npz(bundle_dir / "roi_masks.npz", arrays, config)
    json_path = outputs.save_json(bundle_dir / "roi_mappings.json", table, config)
    return npz_path, json_path


def save_fsaverage_bundle(fsaverage_masks: dict, bundle_dir=ASSETS_DIR, config=None) -> Path:
    """Write fsaverage masks as packed bits (20 KB a hemisphere before compression) under keys 'subj01/lh'."""
    arrays = {f"{paths.subject_dir_name(s)}/{hemi}": np.packbits(mask.astype(bool))
              for s, by_hemi in fsaverage_masks.items() for hemi, mask in by_hemi.items()}
    return outputs.save_npz(Path(bundle_dir) / FSAVERAGE_BUNDLE, arrays, config)


def _bundle_subjects(npz_path) -> set:
    with np.load(npz_path, allow_pickle=False) as npz:
        return {int(k.split("/")[0][4:]) for k in npz.files}


def _require(path: Path) -> None:
    if not path.is_file():
        raise options.DataError(f"{path}: bundled masks not found; rebuild with --rebuild_mask_bundle=true "
                                "--mask_source=<folder of real masks>, or pass --mask_source")


def _open_bundle(path: Path, subjects) -> list[int]:
    """The bundled subjects to load (all, or those asked for, each checked to be there)."""
    _require(path)
    bundled = _bundle_subjects(path)
    missing = sorted(set(subjects or ()) - bundled)
    if missing:
        raise options.DataError(f"{path}: no masks of subject(s) {missing}; bundled: "
                                + ", ".join(str(s) for s in sorted(bundled)))
    return sorted(bundled if subjects is None else set(subjects))


def load_mask_bundle(bundle_dir=ASSETS_DIR, subjects=None):
    """The bundled masks -> ({subject: {hemi: {family: int64 labels}}}, {subject: {family: {id: name}}})."""
    bundle_dir = Path(bundle_dir)
    npz_path, json_path = bundle_dir / "roi_masks.npz", bundle_dir / "roi_mappings.json"
    _require(json_path)
    chosen = _open_bundle(npz_path, subjects)
    table = json.loads(json_path.read_text())
    masks, mappings = {}, {}
    with np.load(npz_path, allow_pickle=False) as npz:
        for subject in chosen:
            s2 = paths.subject_dir_name(subject)
            masks[subject] = {hemi: {fam: npz[f"{s2}/{hemi}.{fam}"].astype(np.int64) for fam in utils.ROI_FAMILIES}
                              for hemi in utils.HEMISPHERES}
            by_family = table.get(s2, table)
            mappings[subject] = {fam: {int(k): v for k, v in by_family[fam].items()} for fam in utils.ROI_FAMILIES}
    return masks, mappings


def load_fsaverage_bundle(bundle_dir=ASSETS_DIR, subjects=None) -> dict:
    """The bundled fsaverage masks -> {subject: {hemi: bool array of fsaverage's 163,842 vertices}}."""
    path = Path(bundle_dir) / FSAVERAGE_BUNDLE
    chosen = _open_bundle(path, subjects)
    with np.load(path, allow_pickle=False) as npz:
        return {s: {hemi: np.unpackbits(npz[f"{paths.subject_dir_name(s)}/{hemi}"],
                                        count=utils.FSAVERAGE_VERTICES).astype(bool) for hemi in utils.HEMISPHERES}
                for s in chosen}


def write_roi_masks(masks, mappings, subject: int, roi_dir) -> Path:
    """Write one subject's masks in the official layout.

    int64 {lh,rh}.<family>_challenge_space.npy and mapping_<family>.npy (pickled dict in a 0-d object array).
    """
    roi_dir = Path(roi_dir)
    for hemi in utils.HEMISPHERES:
        for family in utils.ROI_FAMILIES:
            outputs.save_npy(roi_dir / f"{hemi}.{family}_challenge_space.npy",
                             masks[subject][hemi][family].astype(np.int64))
    for family in utils.ROI_FAMILIES:
        # The official files are a pickled dict in a 0-d object array; utils.load_roi_mapping reads them safely.
        mapping = np.array(dict(mappings[subject][family]), dtype=object)
        outputs.atomic_write(roi_dir / f"mapping_{family}.npy", lambda f, m=mapping: np.save(f, m), suffix=".tmp.npy")
    return roi_dir


def write_fsaverage_masks(fsaverage_masks: dict, subject: int, roi_dir) -> Path:
    """Write one subject's {lh,rh}.all-vertices_fsaverage_space.npy as the download has them (int64 0/1)."""
    roi_dir = Path(roi_dir)
    for hemi in utils.HEMISPHERES:
        outputs.save_npy(roi_dir / utils.FSAVERAGE_MASK.format(hemi=hemi),
                         fsaverage_masks[subject][hemi].astype(np.int64))
    return roi_dir


def rebuild(source, bundle_dir=ASSETS_DIR, config=None) -> list[Path]:
    """Bundle every subject's masks of a real mask folder, then check the bundle reads back exactly what was read."""
    masks, mappings = read_mask_folder(source)
    fsaverage = read_fsaverage_masks(source, sorted(masks))
    written = [*save_mask_bundle(masks, mappings, bundle_dir, config), save_fsaverage_bundle(fsaverage, bundle_dir,
                                                                                             config)]
    again, again_mappings = load_mask_bundle(bundle_dir)
    again_fsaverage = load_fsaverage_bundle(bundle_dir)
    same = again_mappings == mappings and all(
        np.array_equal(again[s][h][f], masks[s][h][f]) and np.array_equal(again_fsaverage[s][h], fsaverage[s][h])
        for s in masks for h in utils.HEMISPHERES for f in utils.ROI_FAMILIES)
    if not same:
        raise options.DataError(f"{bundle_dir}: the rebuilt bundle does not read back as {source}")
    return written
