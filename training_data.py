"""Training data: each subject's ROI source, a torch Dataset over memory-mapped image caches, the batch sampler.

The batches of an epoch depend on (seed, epoch) alone. Each global batch comes from one source (subject) and is
split over the ranks of torch.distributed (DistributedSampler semantics: num_replicas, rank, set_epoch), so DDP
on N ranks sees exactly the global batches of one process.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import options
import utils
from runtime import prefetched, read_rows

ORDERS = ("interleaved", "sequential")
BATCHINGS = ("even", "remainder")


# ---------------------------------------------------------------------------------------------
# Sources: one subject's images, ROI fMRI and split each.
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One subject's share of a ROI model's data."""
    subject: int
    images: np.ndarray          # N x 3 x S x S uint8 image cache (memmap)
    fmri: np.ndarray            # N x V float32 fMRI of the ROI (in RAM)
    voxel_indices: np.ndarray   # the ROI's V vertex indices
    split: dict                 # 'train' / 'val' row indices (the NSD-keyed split)


def roi_fmri(subject_data: utils.Subject, hemi: str, roi: str, min_voxels: int):
    """-> (N x V float32 fMRI of the ROI in RAM, its vertex indices); DataError when under min_voxels (the
    training scripts' option: a smaller ROI gives a degenerate head, h = 0.8 V, and noisy targets)."""
    (roi,) = utils.check_roi_names([roi])
    idx = subject_data.roi_voxel_indices[hemi][roi]
    if len(idx) < max(1, min_voxels):
        raise options.DataError(f"subject {subject_data.subject} {hemi} {roi}: {len(idx)} voxels; training needs at "
                                f"least {min_voxels} (some ROIs are empty for some subjects)")
    return np.ascontiguousarray(subject_data.fmri[hemi][:, idx], dtype=np.float32), idx


def roi_source(subject_data: utils.Subject, hemi: str, roi: str, min_voxels: int) -> Source:
    """The Source of one subject's ROI (DataError when under min_voxels voxels)."""
    fmri, idx = roi_fmri(subject_data, hemi, roi, min_voxels)
    return Source(subject_data.subject, subject_data.images, fmri, idx, subject_data.split)


def training_subjects(data_dir, subjects=(), exclude_subject: int = 0) -> tuple[list[int], bool]:
    """(subjects, pooled) of a training script's `subjects`: one subject trains its own model; several, [] or
    'all' (every subject in data_dir) one model pooled over them, but exclude_subject (0 = none), whose files are
    then never opened."""
    named = list(subjects)
    found = utils.resolve_subjects(data_dir, named)
    pooled = len(found) > 1 or not named or named in (["all"], ("all",))
    if exclude_subject and not pooled:
        raise options.OptionsError(f"--exclude_subject={exclude_subject}: leave-one-subject-out models are pooled; "
                                   "give several subjects (--subjects=all)")
    if exclude_subject and int(exclude_subject) not in found:
        raise options.DataError(f"--exclude_subject={exclude_subject}: not among the subjects to pool {found}")
    kept = [s for s in found if s != int(exclude_subject)]
    if not kept:
        raise options.DataError(f"{data_dir}: no subjects left to train on (subjects {found}, excluding "
                                f"{exclude_subject})")
    return kept, pooled


def trainable_sources(subjects_data, hemi: str, roi: str, min_voxels: int) -> tuple[list[Source], dict]:
    """Sources of the subjects whose ROI has >= min_voxels voxels, and {subject: voxels} of those left out."""
    sources, skipped = [], {}
    for subject_data in subjects_data:
        n = len(subject_data.roi_voxel_indices[hemi][roi])
        if n >= max(1, min_voxels):
            sources.append(roi_source(subject_data, hemi, roi, min_voxels))
        else:
            skipped[subject_data.subject] = n
    return sources, skipped


# ---------------------------------------------------------------------------------------------
# Batches: Dataset, sampler, DataLoader.
# ---------------------------------------------------------------------------------------------


class ImageRows(Dataset):
    """The images of one or more uint8 N x 3 x S x S caches (one per source), concatenated; item = one image.

    __getitems__ reads a whole batch (rows of one source, sorted by the sampler) in one pass over the memmap and
    returns {'source': int, 'rows': int64 tensor of row numbers within the source, 'images': uint8 tensor}.
    Pickling (worker processes started by spawn/forkserver) reopens memmaps by file name instead of copying them.
    """

    def __init__(self, caches, pin: bool = False):
        self.caches = list(caches)
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in self.caches])]).astype(np.int64)
        self.pin = pin

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def flat_indices(self, source: int, rows) -> np.ndarray:
        """Dataset indices of a source's rows."""
        return np.asarray(rows, dtype=np.int64) + self.offsets[source]

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            raise ValueError("empty batch")
        source = int(np.searchsorted(self.offsets, indices[0], side="right") - 1)
        rows = indices - self.offsets[source]
        if rows.min() < 0 or rows.max() >= len(self.caches[source]):
            raise ValueError("a batch must hold images of one source only")
        return {"source": source, "rows": torch.from_numpy(rows), "images": read_rows(self.caches[source], rows,
                                                                                      self.pin)}

    def __getitem__(self, index: int) -> dict:
        batch = self.__getitems__([index])
        return {"source": batch["source"], "row": int(batch["rows"][0]), "image": batch["images"][0]}

    def __getstate__(self):
        return {**self.__dict__, "caches": [_memmap_reference(c) for c in self.caches]}

    def __setstate__(self, state):
        self.__dict__.update({**state, "caches": [_reopen(c) for c in state["caches"]]})


def _memmap_reference(array):
    """A whole-file read-only np.memmap as (file name, dtype, shape, offset); any other array as itself."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename \
            and array.flags.c_contiguous:
        return ("memmap", str(array.filename), array.dtype.str, tuple(array.shape), int(array.offset))
    return array


def _reopen(reference):
    if isinstance(reference, tuple) and reference and reference[0] == "memmap":
        _, filename, dtype, shape, offset = reference
        return np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
    return reference


def cut_batches(rows: np.ndarray, batch_size: int, batching: str = "even") -> list[np.ndarray]:
    """rows cut in order into batches: 'even', ceil(n / batch_size) of near-equal size (none larger than batch_size);
    'remainder', batch_size each and a smaller last one (PyTorch's DataLoader, the original), a last one under 3
    rows joining the one before (BatchNorm needs a few rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    if batching == "even":
        return np.array_split(rows, max(1, math.ceil(len(rows) / batch_size)))
    if batching != "remainder":
        raise ValueError(f"batching={batching!r}: expected one of {', '.join(BATCHINGS)}")
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)] or [rows]
    if len(batches) > 1 and len(batches[-1]) < 3:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


class GlobalBatchSampler(Sampler):
    """Yields this rank's share (dataset indices) of every global batch of the epoch set by set_epoch.

    shuffle=True: each source's rows are permuted from (seed, epoch, source) and cut into batches (cut_batches:
    'even' by default, no small remainder batch, so every contrastive batch stays large and BatchNorm well
    defined), each sorted for sequential reads. order='interleaved': the sources' batches are merged in a
    random order drawn from (seed, epoch), each source's batches keeping their own order; 'sequential': all of
    source 0's batches, then source 1's, ... (as the original pooled training). shuffle=False (validation):
    each source's sorted rows cut in order, sources in order. A global batch is split over the ranks as
    np.array_split does (rank r takes part r, sizes differ by at most one).
    """

    def __init__(self, dataset: ImageRows, rows_per_source, batch_size: int, seed: int = 0, shuffle: bool = True,
                 order: str = "interleaved", num_replicas: int = 1, rank: int = 0, batching: str = "even"):
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: expected one of {', '.join(ORDERS)}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in 0..{num_replicas - 1}")
        self.dataset = dataset
        self.rows_per_source = [np.sort(np.asarray(r, dtype=np.int64)) for r in rows_per_source]
        self.batch_size, self.seed, self.shuffle, self.order = int(batch_size), int(seed), shuffle, order
        self.num_replicas, self.rank, self.batching = int(num_replicas), int(rank), batching
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[tuple[int, np.ndarray]]:
        """(source, sorted rows within the source) of every global batch of the current epoch, in order."""
        per_source = []
        for source, rows in enumerate(self.rows_per_source):
            if self.shuffle:
                rows = np.random.default_rng([self.seed, self.epoch, 0, source]).permutation(rows)
            per_source.append([np.sort(b) for b in cut_batches(rows, self.batch_size, self.batching)])
        labels = np.repeat(np.arange(len(per_source)), [len(b) for b in per_source])
        if self.shuffle and self.order == "interleaved":
            labels = np.random.default_rng([self.seed, self.epoch, 1]).permutation(labels)
        taken = [iter(b) for b in per_source]
        return [(int(s), next(taken[s])) for s in labels]

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's part of a global batch."""
        return np.array_split(rows, self.num_replicas)[self.rank]

    def __iter__(self):
        for source, rows in self.global_batches():
            yield self.dataset.flat_indices(source, self.shard(rows)).tolist()

    def __len__(self) -> int:
        return sum(len(cut_batches(r, self.batch_size, self.batching)) for r in self.rows_per_source)


def _as_is(batch):
    return batch  # ImageRows.__getitems__ already returns the batch


def make_loader(dataset: ImageRows, sampler: GlobalBatchSampler, device, workers: int = 0) -> DataLoader:
    """DataLoader of the sampler's batches, in pinned memory for CUDA copies; iterate it with read_batches.

    workers > 0: worker processes read ahead and hand batches over through shared memory (/dev/shm; where that
    is small, e.g. docker's 64 MB, use 0). workers = 0: read_batches reads one batch ahead in a thread of this
    process, straight into (pinned) memory: measured faster here (benchmark.py --benchmarks=loader).
    """
    pin = torch.device(device).type == "cuda"
    dataset.pin = pin and workers == 0  # workers hand over shared memory, which the loader's pin thread pins
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_as_is, num_workers=int(workers), pin_memory=pin,
                      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                      generator=torch.Generator())  # worker seeds drawn from here, not from the global RNG


def read_batches(loader: DataLoader):
    """Iterate a loader with reads overlapping compute: its worker processes, or (0 workers) one reader thread
    that fetches the next batch while the caller works on this one (numpy's row copies release the GIL)."""
    if loader.num_workers > 0:
        yield from loader
        return
    batches = iter(loader)
    for batch, _ in prefetched(lambda _: next(batches), range(len(loader))):
        yield batch
