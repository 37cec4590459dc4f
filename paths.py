"""The out_dir layout: where every stage writes what a later stage reads (docs/outputs.md mirrors it).

    splits/subjXX_split.json                                  the one train/val/test split of a subject
    image_cache/subjXX_{train,challenge}_<S>px.npy            decoded uint8 images (probe_<dataset>_<key>.npy)
    voxel_roi_mappings/subjXX/{lh,rh}_*                       ROI names per vertex, ROI vertex indices
    features/subjXX/<backbone tag>/                           cached layer features and fitted PCAs
    searches/<backbone>/untuned/subjXX/{lh,rh}.json           layer searches of the untuned backbone (all ROIs)
    searches/external/<name>/subjXX/{lh,rh}.json              ... of an external feature set
    searches/<model dir>/on-subjXX.json                       ... of one tuned backbone on the encoded subject
    models/<backbone>/<cl|reg>/subjXX/<hemi>/<roi>/seed<K>/   a per-subject model: best.pt, last.pt, log.csv, done.json
    models/<backbone>/pooled-<cl-hconst|cl-havg|reg>/<hemi>/<roi>/[loso-subjXX/]seed<K>/   a pooled model
    models/<backbone>/<cl|reg|pooled-*>/summary*.csv          sweep summaries
"""
from __future__ import annotations

from pathlib import Path

POOLED_DIRS = {("cl", "constant"): "pooled-cl-hconst", ("cl", "average"): "pooled-cl-havg",
               ("reg", None): "pooled-reg"}   # (method, CL hidden-size rule) -> folder of the pooled models
CHECKPOINTS = ("best", "last")               # best: lowest val loss; last: the final epoch (and resume point)


def subject_dir_name(subject: int) -> str:
    """1 -> 'subj01'."""
    return f"subj{int(subject):02d}"


def backbone_dir_name(backbone: str) -> str:
    """A backbone name as one folder: 'timm:convnext_tiny' -> 'timm-convnext_tiny', 'open_clip:RN50/openai' ->
    'open_clip-RN50_openai'."""
    return str(backbone).replace(":", "-").replace("/", "_")


# ---- data-derived caches ----

def split_file(out_dir, subject: int) -> Path:
    return Path(out_dir) / "splits" / f"{subject_dir_name(subject)}_split.json"


def image_cache_file(out_dir, subject: int, size: int, tag: str = "train") -> Path:
    """tag: 'train' (the training images, fMRI row order) or 'challenge' (the challenge test images)."""
    return Path(out_dir) / "image_cache" / f"{subject_dir_name(subject)}_{tag}_{int(size)}px.npy"


def probe_cache_file(out_dir, dataset: str, key: str) -> Path:
    return Path(out_dir) / "image_cache" / f"probe_{dataset}_{key}.npy"


def mappings_dir(out_dir, subject: int) -> Path:
    return Path(out_dir) / "voxel_roi_mappings" / subject_dir_name(subject)


def feature_cache_dir(out_dir, subject: int, backbone_tag: str) -> Path:
    return Path(out_dir) / "features" / subject_dir_name(subject) / backbone_tag


# ---- models ----

def method_dir_name(method: str, pooled: bool = False, pooled_h_method: str = "constant") -> str:
    """'cl' / 'reg' for per-subject models; 'pooled-cl-hconst', 'pooled-cl-havg' or 'pooled-reg' for pooled ones."""
    if not pooled:
        return method
    key = (method, pooled_h_method if method == "cl" else None)
    if key not in POOLED_DIRS:
        import options
        raise options.OptionsError(f"pooled_h_method={pooled_h_method!r}: expected constant or average")
    return POOLED_DIRS[key]


def model_dir(out_dir, method: str, hemi: str, roi: str, *, subject: int | None = None, seed: int = 0,
              backbone: str = "alexnet", exclude_subject: int | None = None,
              pooled_h_method: str = "constant") -> Path:
    """One ROI model's folder: per subject when `subject` is given, else the model pooled over subjects
    (exclude_subject: the leave-one-subject-out model trained without that subject)."""
    root = Path(out_dir) / "models" / backbone_dir_name(backbone)
    if subject is not None:
        folder = root / method / subject_dir_name(subject) / hemi / roi
    else:
        folder = root / method_dir_name(method, True, pooled_h_method) / hemi / roi
        if exclude_subject:
            folder = folder / f"loso-{subject_dir_name(exclude_subject)}"
    return folder / f"seed{int(seed)}"


def checkpoint_file(run_dir, which: str = "best") -> Path:
    if which not in CHECKPOINTS:
        raise ValueError(f"which={which!r}: expected one of {', '.join(CHECKPOINTS)}")
    return Path(run_dir) / f"{which}.pt"


def log_file(run_dir) -> Path:
    return Path(run_dir) / "log.csv"


def done_file(run_dir) -> Path:
    """Written when a model has finished training (its summary); sweeps skip models that have one."""
    return Path(run_dir) / "done.json"


def sweep_summary_file(out_dir, method: str, *, subject: int | None = None, backbone: str = "alexnet",
                       exclude_subject: int | None = None, pooled_h_method: str = "constant",
                       shard=(0, 1)) -> Path:
    """models/<backbone>/<method dir>/summary[_subjXX][_loso-subjXX][_shard-i-of-n].csv."""
    i, n = shard
    name = "summary" + (f"_{subject_dir_name(subject)}" if subject is not None else "") \
        + (f"_loso-{subject_dir_name(exclude_subject)}" if exclude_subject else "") \
        + (f"_shard-{i}-of-{n}" if n > 1 else "") + ".csv"
    return Path(out_dir) / "models" / backbone_dir_name(backbone) \
        / method_dir_name(method, subject is None, pooled_h_method) / name


# ---- layer searches ----

def search_file(out_dir, subject: int, hemi: str, *, backbone: str = "alexnet", feature_set: str = "untuned",
                run_dir=None) -> Path:
    """The layer search of one feature set on one subject and hemisphere.

    Untuned and external sets: one file for every ROI of the hemisphere; a tuned backbone (run_dir: its model
    folder under out_dir/models): one file per encoded subject beside the mirror of that folder.
    """
    root = Path(out_dir) / "searches"
    if run_dir is not None:
        relative = Path(run_dir).resolve().relative_to((Path(out_dir) / "models").resolve())
        return root / relative / f"on-{subject_dir_name(subject)}.json"
    if feature_set.startswith("external:"):
        return root / "external" / feature_set.split(":", 1)[1] / subject_dir_name(subject) / f"{hemi}.json"
    return root / backbone_dir_name(backbone) / feature_set / subject_dir_name(subject) / f"{hemi}.json"
