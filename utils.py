"""The data layer: the Algonauts 2023 layout, ROIs and masks, validation, noise ceilings, the one split, one subject loader."""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import image_cache
import paths
from options import DataError
from outputs import save_json
from paths import subject_dir_name


# ---- ROIs ----

HEMISPHERES = ("lh", "rh")
ROI_FAMILIES = ("prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words", "streams")
ROIS_BY_FAMILY = {
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "floc-bodies": ("EBA", "FBA-1", "FBA-2", "mTL-bodies"),
    "floc-faces": ("OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"),
    "floc-places": ("OPA", "PPA", "RSC"),
    "floc-words": ("OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"),
    "streams": ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"),
}
ROI_NAMES = tuple(r for fam in ROI_FAMILIES for r in ROIS_BY_FAMILY[fam])
ROI_FAMILY_OF = {r: fam for fam in ROI_FAMILIES for r in ROIS_BY_FAMILY[fam]}
ROI_GROUPS = {
    "Early": ROIS_BY_FAMILY["prf-visualrois"],
    "Higher": tuple(r for fam in ("floc-bodies", "floc-faces", "floc-places", "floc-words")
                    for r in ROIS_BY_FAMILY[fam]),
    "Anatomical": ROIS_BY_FAMILY["streams"],
}


def roi_group(roi: str) -> str:
    """'Early', 'Higher' or 'Anatomical' ('' for a name in no group)."""
    return next((g for g, members in ROI_GROUPS.items() if roi in members), "")


def check_roi_names(names) -> list[str]:
    """Strip names and check each is one of the 31 challenge ROIs (one-line error listing them otherwise)."""
    out = []
    for name in names:
        name = str(name).strip()
        if name not in ROI_FAMILY_OF:
            raise DataError(f"unknown ROI {name!r}; valid ROIs: " + ", ".join(ROI_NAMES))
        out.append(name)
    return out


# ---- Restricted unpickling of the official mapping_<family>.npy files (pickled dicts) ----

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"{self._source}: refusing to unpickle {module}.{name}; a mapping file may "
                            "hold only a dict of ints to strings")
        import numpy._core.multiarray as multiarray
        if name in ("_reconstruct", "scalar"):
            return getattr(multiarray, name)
        return getattr(np, name)


def load_roi_mapping(path) -> dict[int, str]:
    """Read an official mapping_<family>.npy (a pickled {int: ROI name} dict) without running code from it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mapping file not found")
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            _, _, dtype = read_header(fh)
        except ValueError as err:
            raise DataError(f"{path}: not a .npy file ({err})") from None
        if dtype != np.dtype(object):
            raise DataError(f"{path}: expected a pickled dict of ROI ids to names, found a {dtype} array")
        try:
            obj = _RestrictedUnpickler(fh, path).load()
        except DataError:
            raise
        except Exception as err:  # corrupt pickle stream
            raise DataError(f"{path}: unreadable mapping file ({type(err).__name__}: {err})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if not isinstance(obj, dict) or not all(isinstance(k, (int, np.integer)) and isinstance(v, str)
                                            for k, v in obj.items()):
        raise DataError(f"{path}: expected a dict of int ROI ids to ROI names")
    return {int(k): v.strip() for k, v in obj.items()}


# ---- The Algonauts 2023 layout (official, or the older re-arranged one), auto-detected ----

_NSD_ID = re.compile(r"nsd-(\d+)")


@dataclass
class SubjectPaths:
    """Where one subject's files are."""
    subject: int
    layout: str
    fmri: dict                      # hemi -> Path of the N x V training fMRI
    train_images: Path              # folder of the training PNGs
    test_images: Path | None        # folder of the challenge test PNGs (no fMRI), if present
    roi_dir: Path                   # folder of the ROI masks and mapping files
    noise_ceiling: dict = field(default_factory=dict)  # hemi -> Path, where the data has one

    def mask_path(self, hemi: str, family: str) -> Path:
        return self.roi_dir / f"{hemi}.{family}_challenge_space.npy"

    def mapping_path(self, family: str) -> Path:
        return self.roi_dir / f"mapping_{family}.npy"

    def fsaverage_mask_path(self, hemi: str) -> Path:
        return self.roi_dir / FSAVERAGE_MASK.format(hemi=hemi)


FSAVERAGE_VERTICES = 163842  # vertices per hemisphere of FreeSurfer's fsaverage (ico7) surface
FSAVERAGE_MASK = "{hemi}.all-vertices_fsaverage_space.npy"  # the download's challenge vertices on fsaverage


def find_subject(data_dir, subject: int) -> SubjectPaths:
    """Locate one subject's files in either layout, or say what was looked for and where."""
    data_dir = Path(data_dir)
    s2 = subject_dir_name(subject)
    official = data_dir / s2
    if (official / "training_split").is_dir() or (official / "roi_masks").is_dir():
        fmri_dir = official / "training_split" / "training_fmri"
        nc = {h: official / "noise_ceiling" / f"{h}_noise_ceiling.npy" for h in HEMISPHERES}
        return SubjectPaths(
            subject, "official",
            {h: fmri_dir / f"{h}_training_fmri.npy" for h in HEMISPHERES},
            official / "training_split" / "training_images",
            official / "test_split" / "test_images" if (official / "test_split" / "test_images").is_dir() else None,
            official / "roi_masks",
            {h: p for h, p in nc.items() if p.is_file()})
    for tag in (f"Subj{int(subject)}", f"Subj{int(subject):02d}"):
        old_fmri = data_dir / "training_fmri" / tag
        if old_fmri.is_dir():
            low = tag.lower()
            test_dir = data_dir / "test_images" / tag
            return SubjectPaths(
                subject, "rearranged",
                {h: old_fmri / f"{low}_{h}_training_fmri.npy" for h in HEMISPHERES},
                data_dir / "training_images" / tag,
                test_dir if test_dir.is_dir() else None,
                data_dir / "roi_masks" / tag)
    raise DataError(
        f"subject {subject} not found under {data_dir}: looked for {official}/training_split (official "
        f"Algonauts 2023 layout) and {data_dir}/training_fmri/Subj{int(subject)} (re-arranged layout)")


def list_subjects(data_dir) -> list[int]:
    """Subjects present in data_dir, in either layout."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data_dir not found (point --data_dir at the Algonauts 2023 download)")
    found = {int(m.group(1)) for p in data_dir.iterdir() if (m := re.fullmatch(r"subj(\d+)", p.name))}
    old = data_dir / "training_fmri"
    if old.is_dir():
        found |= {int(m.group(1)) for p in old.iterdir() if (m := re.fullmatch(r"Subj(\d+)", p.name))}
    if not found:
        raise DataError(f"{data_dir}: no subjects found (expected subj01.. folders or training_fmri/Subj1..)")
    return sorted(found)


def resolve_subjects(data_dir, subjects) -> list[int]:
    """The subjects an option names ([] or 'all' = every subject present)."""
    if not subjects or subjects in ("all", ["all"]):
        return list_subjects(data_dir)
    return [int(s) for s in subjects]


def list_images(folder) -> list[Path]:
    """The PNGs of a folder, sorted by name (the order of the fMRI rows)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")


def nsd_ids(image_paths) -> np.ndarray | None:
    """NSD image ids parsed from 'train-NNNN_nsd-NNNNN.png' names, or None where a name has none."""
    ids = []
    for p in image_paths:
        m = _NSD_ID.search(Path(p).name)
        if not m:
            return None
        ids.append(int(m.group(1)))
    return np.asarray(ids, dtype=np.int64)


# ---- Loading and validation ----


def load_fmri(paths: SubjectPaths, hemi: str) -> np.ndarray:
    """Memory-map one hemisphere's N x V training fMRI as float32 (checked 2-D)."""
    path = paths.fmri[hemi]
    if not path.is_file():
        raise DataError(f"{path}: {hemi} training fMRI file not found")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D images x vertices array, found shape {arr.shape}")
    if arr.dtype != np.float32:
        arr = np.asarray(arr, dtype=np.float32)
    return arr


def check_finite(arr: np.ndarray, source, chunk_rows: int = 512) -> None:
    """Raise DataError if arr holds NaN or inf (scanned in row chunks to keep memory flat)."""
    for start in range(0, arr.shape[0], chunk_rows):
        block = np.asarray(arr[start:start + chunk_rows])
        if not np.isfinite(block).all():
            bad = np.argwhere(~np.isfinite(block))[0]
            raise DataError(f"{source}: non-finite value (NaN or inf) at row {start + bad[0]}, "
                            f"column {bad[1]}; expected finite responses")


def load_roi_masks(paths: SubjectPaths, hemi: str, n_vertices: int | None = None) -> dict[str, np.ndarray]:
    """ROI name -> boolean vertex mask for all 31 challenge ROIs of one hemisphere."""
    masks = {}
    for family in ROI_FAMILIES:
        mask_file = paths.mask_path(hemi, family)
        if not mask_file.is_file():
            raise DataError(f"{mask_file}: ROI mask file not found")
        try:
            labels = np.load(mask_file, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{mask_file}: not a readable .npy array ({err})") from None
        if labels.ndim != 1:
            raise DataError(f"{mask_file}: expected a 1-D vertex mask, found shape {labels.shape}")
        if n_vertices is not None and labels.shape[0] != n_vertices:
            raise DataError(f"{mask_file}: mask has {labels.shape[0]} vertices, expected {n_vertices} "
                            f"(the columns of {paths.fmri[hemi].name})")
        mapping = load_roi_mapping(paths.mapping_path(family))
        labels = np.rint(labels).astype(np.int64)
        for roi_id, name in mapping.items():
            if roi_id == 0 or name == "Unknown":
                continue
            if name not in ROI_FAMILY_OF:
                raise DataError(f"{paths.mapping_path(family)}: unknown ROI name {name!r}")
            masks[name] = labels == roi_id
    for name in ROI_NAMES:  # a family whose mapping omits an ROI: it is empty
        if name not in masks:
            length = n_vertices if n_vertices is not None else next(iter(masks.values())).shape[0]
            masks[name] = np.zeros(length, dtype=bool)
    return {name: masks[name] for name in ROI_NAMES}


def load_fsaverage_mask(path, n_vertices: int | None = None) -> np.ndarray:
    """{lh,rh}.all-vertices_fsaverage_space.npy as booleans: its ones, in order, are the fMRI columns."""
    try:
        mask = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:  # missing, or not a .npy file
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if mask.shape != (FSAVERAGE_VERTICES,) or not np.isin(mask, (0, 1)).all() or n_vertices not in (None, mask.sum()):
        raise DataError(f"{path}: {mask.shape} array, {np.count_nonzero(mask)} nonzero; expected {FSAVERAGE_VERTICES}"
                        f" zeros and ones, {n_vertices or 'V'} ones (the fMRI columns)")
    return mask.astype(bool)


def roi_voxel_indices(paths: SubjectPaths, hemi: str, n_vertices: int | None = None) -> dict[str, np.ndarray]:
    """ROI name -> sorted int64 vertex indices (empty arrays for empty ROIs)."""
    return {name: np.flatnonzero(m) for name, m in load_roi_masks(paths, hemi, n_vertices).items()}


def voxel_roi_lists(roi_indices: dict[str, np.ndarray], n_vertices: int) -> list[list[str]]:
    """One list of ROI names per vertex (several, or none), from ROI name -> vertex indices."""
    names = list(roi_indices)
    membership = np.zeros((n_vertices, len(names)), dtype=bool)  # vertices x ROIs
    for j, name in enumerate(names):
        membership[roi_indices[name], j] = True
    # Few distinct membership patterns exist: build each name list once and index by pattern.
    patterns, pattern_of_vertex = np.unique(membership, axis=0, return_inverse=True)
    pattern_lists = [[names[j] for j in np.flatnonzero(row)] for row in patterns]
    return [pattern_lists[k] for k in pattern_of_vertex.ravel()]


def validate_subject(paths: SubjectPaths, check_values: bool = True, noise_ceiling_dir=None) -> dict:
    """Check a subject's files agree (images = fMRI rows, masks and noise ceilings = fMRI columns, finite values).

    Returns {'n_images': N, 'n_vertices': {hemi: V}, 'images': [Path, ...], 'noise_ceiling': {hemi: V or None}}.
    """
    images = list_images(paths.train_images)
    if not images:
        raise DataError(f"{paths.train_images}: no PNG training images found")
    image_cache.check_png_files(images)
    n_vertices, ceilings = {}, {}
    for hemi in HEMISPHERES:
        fmri = load_fmri(paths, hemi)
        if fmri.shape[0] != len(images):
            raise DataError(f"{paths.fmri[hemi]}: {fmri.shape[0]} fMRI rows, expected {len(images)} "
                            f"(one per PNG in {paths.train_images})")
        if check_values:
            check_finite(fmri, paths.fmri[hemi])
        load_roi_masks(paths, hemi, fmri.shape[1])
        n_vertices[hemi] = fmri.shape[1]
        ceilings[hemi] = load_noise_ceiling(paths, hemi, fmri.shape[1], noise_ceiling_dir)
    if paths.test_images is not None:
        image_cache.check_png_files(list_images(paths.test_images))
    return {"n_images": len(images), "n_vertices": n_vertices, "images": images, "noise_ceiling": ceilings}


def load_noise_ceiling(paths: SubjectPaths, hemi: str, n_vertices: int | None = None,
                       noise_ceiling_dir=None) -> np.ndarray | None:
    """Per-vertex noise ceiling as a float32 fraction (0..1) of explainable variance, validated; None if absent.

    The challenge download has none: give noise_ceiling_dir with subjXX/{lh,rh}_noise_ceiling.npy (1-D over the
    challenge-space vertices), e.g. from NSD's ncsnr: NC = ncsnr^2 / (ncsnr^2 + 1/n), n the repeats averaged (3),
    or the organisers' test-split files. Else the data's own <data_dir>/subjXX/noise_ceiling/ (the demo's).
    Values in 0..100 with a maximum above 1 are taken as percentages and divided by 100 (with a note).
    """
    path = paths.noise_ceiling.get(hemi)
    if noise_ceiling_dir is not None:
        path = Path(noise_ceiling_dir) / subject_dir_name(paths.subject) / f"{hemi}_noise_ceiling.npy"
        if not path.is_file():
            raise DataError(f"{path}: noise ceiling file not found (expected <noise_ceiling_dir>/subjXX/"
                            "{lh,rh}_noise_ceiling.npy, one value per challenge-space vertex)")
    if path is None:
        return None
    try:
        nc = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if nc.ndim != 1 or (n_vertices is not None and nc.shape[0] != n_vertices) or nc.dtype.kind not in "fiu":
        raise DataError(f"{path}: noise ceiling of shape {nc.shape} ({nc.dtype}), expected a 1-D numeric array "
                        f"of {n_vertices if n_vertices is not None else 'V'} vertices (the {hemi} fMRI columns)")
    nc = nc.astype(np.float64)
    if not np.isfinite(nc).all():
        bad = np.flatnonzero(~np.isfinite(nc))[0]
        raise DataError(f"{path}: non-finite noise ceiling (NaN or inf) at vertex {bad}; expected finite values")
    if nc.size and (nc.min() < 0 or nc.max() > 100):
        raise DataError(f"{path}: noise ceiling values in [{nc.min():.3g}, {nc.max():.3g}]; expected a fraction "
                        "in 0..1 or a percentage in 0..100")
    if nc.size and nc.max() > 1:
        print(f"note: {path}: noise ceiling up to {nc.max():.3g} taken as a percentage, divided by 100")
        nc = nc / 100.0
    return nc.astype(np.float32)


# ---- One train / val / test split for every stage ----

SPLIT_NAMES = ("train", "val", "test")
_NSD_ID_SPACE = 73000  # NSD has 73,000 images


def make_split(image_paths, seed: int = 0, fractions=(0.75, 0.10, 0.15)) -> dict[str, np.ndarray]:
    """Deterministic train/val/test row indices.

    With NSD ids in the names, an image's split depends on its NSD id alone (a seeded permutation of
    the 73k ids), so an image shared by several subjects lands in the same split for all of them and
    cross-subject models never test on another subject's training images.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise DataError(f"split fractions {fractions.tolist()}: expected three non-negative numbers summing to 1")
    n = len(image_paths)
    ids = nsd_ids(image_paths)
    if ids is not None:
        if len(np.unique(ids)) != n:
            raise DataError(f"{Path(image_paths[0]).parent}: an NSD id occurs in two training image names; "
                            "expected one image per id (train-NNNN_nsd-NNNNN.png)")
        u = np.empty(n)
        nsd = ids < _NSD_ID_SPACE
        u[nsd] = np.random.default_rng(seed).permutation(_NSD_ID_SPACE)[ids[nsd]] / _NSD_ID_SPACE
        # an id beyond NSD's 73,000 (other data in this layout) draws from a generator keyed by the id alone,
        # so it too lands in the same split for every subject
        u[~nsd] = [np.random.default_rng([seed, int(i)]).random() for i in ids[~nsd]]
    else:
        print(f"note: {Path(image_paths[0]).parent if n else 'images'}: no NSD ids in the file names; the split is "
              "drawn per subject over file order (images shared by subjects may land in different splits)")
        u = np.random.default_rng(seed).permutation(n) / max(n, 1)
    edges = np.cumsum(fractions)
    which = np.searchsorted(edges, u, side="right").clip(0, 2)
    return {name: np.flatnonzero(which == i) for i, name in enumerate(SPLIT_NAMES)}


def get_split(out_dir, subject: int, image_paths, seed: int = 0,
              fractions=(0.75, 0.10, 0.15)) -> dict[str, np.ndarray]:
    """Read the subject's split from out_dir, writing it the first time; every stage uses this one."""
    path = paths.split_file(out_dir, subject)
    names = [Path(p).name for p in image_paths]
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["image_names"] != names:
            raise DataError(f"{path}: split was made for a different image list ({len(saved['image_names'])} "
                            f"images, now {len(names)}); delete it to make a new split")
        return {k: np.asarray(saved[k], dtype=np.int64) for k in SPLIT_NAMES}
    split = make_split(image_paths, seed, fractions)
    save_json(path, {**{k: v.tolist() for k, v in split.items()}, "seed": seed,
                     "fractions": list(fractions), "image_names": names})
    return split


def load_challenge_images(paths: SubjectPaths, out_dir, size: int) -> np.ndarray | None:
    """The subject's challenge test images (no fMRI), decoded once into a memmapped cache; None if absent."""
    if paths.test_images is None:
        return None
    image_paths = list_images(paths.test_images)
    if not image_paths:
        return None
    return image_cache.load_image_cache(out_dir, paths.subject, image_paths, size=size, tag="challenge")


# ---- One subject loader for every stage ----


def check_hemisphere(hemi: str) -> str:
    if hemi not in HEMISPHERES:
        raise DataError(f"hemisphere {hemi!r}: expected one of {', '.join(HEMISPHERES)}")
    return hemi


@dataclass
class Subject:
    """One subject's validated data, as every stage uses it."""
    subject: int
    paths: SubjectPaths
    image_paths: list                    # training PNGs in fMRI row order
    n_vertices: dict                     # hemi -> V
    split: dict | None                   # 'train' / 'val' / 'test' row indices (None without out_dir)
    images: np.ndarray | None            # N x 3 x S x S uint8 image cache (memmap), None without image_size
    fmri: dict                           # hemi -> N x V float32 (memmap, or in RAM)
    roi_voxel_indices: dict              # hemi -> {ROI: sorted vertex indices}
    noise_ceiling: dict                  # hemi -> V fraction of explainable variance, or None


def load_subject(data_dir, subject: int, out_dir=None, image_size: int | None = None, split_seed: int = 0,
                 hemispheres=HEMISPHERES, check_values: bool = True, fmri_in_ram: bool = False,
                 build_first=None, noise_ceiling_dir=None) -> Subject:
    """Validate one subject, then load its split (from out_dir), image cache, fMRI, ROI indices, noise ceiling.

    noise_ceiling_dir: where the per-vertex noise ceilings are (see load_noise_ceiling).
    build_first: an optional context manager under which the split and image cache are made
    (torchrun: rank 0 first, so ranks never build the same cache at once).
    """
    import contextlib
    hemispheres = [check_hemisphere(h) for h in hemispheres]
    paths = find_subject(data_dir, subject)
    info = validate_subject(paths, check_values, noise_ceiling_dir)
    split = images = None
    with build_first() if build_first is not None else contextlib.nullcontext():
        if out_dir is not None:
            split = get_split(out_dir, subject, info["images"], seed=split_seed)
            if image_size is not None:
                images = image_cache.load_image_cache(out_dir, subject, info["images"], size=image_size)
    fmri, rois, ceiling = {}, {}, {}
    for hemi in hemispheres:
        fmri[hemi] = np.array(load_fmri(paths, hemi)) if fmri_in_ram else load_fmri(paths, hemi)
        rois[hemi] = roi_voxel_indices(paths, hemi, info["n_vertices"][hemi])
        ceiling[hemi] = info["noise_ceiling"][hemi]
    return Subject(subject, paths, info["images"], info["n_vertices"], split, images, fmri, rois, ceiling)
