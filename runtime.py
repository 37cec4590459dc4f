"""The runtime: device choice, torch.distributed, bfloat16 autocast policy, and images onto the device.

Everything here is about where and in which precision tensors live, shared by feature extraction and training.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data

import options

def resolve_device(device="auto"):
    """'auto' (or None) -> cuda when present, else cpu; a CUDA device where none exists is a one-line error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise options.OptionsError(f"--device={device}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise options.OptionsError(f"--device={device}: CUDA is not available here (torch.cuda.is_available() is "
                           "False); use --device=cpu or auto")
    return dev


# ---------------------------------------------------------------------------------------------
# Runtime: device, threads and torch.distributed (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK).
# ---------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds caches), the other ranks after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it (an abort at exit otherwise)
            dist.destroy_process_group()


def setup_runtime(device: str = "auto", num_threads: int = 0) -> Runtime:
    """Pick the device ('auto' = cuda if present) and join torch.distributed when launched by torchrun."""
    if num_threads and num_threads > 0:
        torch.set_num_threads(int(num_threads))
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return Runtime(dev, rank, world)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM_CACHE: dict = {}  # (device, mean, std) -> (scale, shift) of the normalisation


def prepare_images(batch_uint8, device, channels_last: bool = False, flip=None, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD) -> torch.Tensor:
    """uint8 N x 3 x S x S (numpy or tensor) -> float32 on device (converted there), normalised with a backbone's
    mean and std (models.normalisation; ImageNet's by default).

    flip: optional bool per image (tensor or array) for horizontal flips, applied on the device.
    """
    device = torch.device(device)
    x = torch.as_tensor(batch_uint8)
    x = x.to(device, non_blocking=True)
    key = (str(device), tuple(float(m) for m in mean), tuple(float(s) for s in std))
    if key not in _NORM_CACHE:  # (x / 255 - mean) / std = x * scale - shift
        mean_t = torch.tensor(key[1], device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(key[2], device=device).view(1, 3, 1, 1)
        _NORM_CACHE[key] = (1.0 / (255.0 * std_t), mean_t / std_t)
    scale, shift = _NORM_CACHE[key]
    if channels_last:  # reorder the 1-byte pixels; the float ops below keep the memory format
        x = x.contiguous(memory_format=torch.channels_last)
    x = x * scale  # uint8 * float32 -> float32 in one pass
    x.sub_(shift)
    if flip is not None:
        flip = torch.as_tensor(flip, dtype=torch.bool).to(device, non_blocking=True)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def prefetched(fetch, items):
    """Yield (fetch(item), seconds the caller waited), fetching the next item in a background thread."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fetch, items[0])
        for k in range(len(items)):
            t0 = time.perf_counter()
            result = future.result()
            waited = time.perf_counter() - t0
            if k + 1 < len(items):
                future = pool.submit(fetch, items[k + 1])
            yield result, waited


def read_rows(images: np.ndarray, rows: np.ndarray, pin: bool = False) -> torch.Tensor:
    """images[rows] (sorted rows read from the uint8 memmap) as a CPU uint8 tensor, pinned for CUDA copies.

    Inside a DataLoader worker it is written straight into shared memory (handed over without another copy).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
        raise IndexError(f"image rows {rows.min()}..{rows.max()} out of range for {len(images)} images")
    shape = (len(rows),) + tuple(images.shape[1:])
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))  # as default_collate does in workers
        buf = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    elif pin:
        buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    else:
        return torch.from_numpy(np.ascontiguousarray(images[rows]))
    np.take(images, rows, axis=0, out=buf.numpy())
    return buf


_CPU_BF16: list = []


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (avx512_bf16 or amx_bf16); emulated bf16 is slower than float32."""
    if not _CPU_BF16:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        _CPU_BF16.append(bool(flags & {"avx512_bf16", "amx_bf16"}))
    return _CPU_BF16[0]


def autocast_context(device, amp: bool = True, cpu_bf16: bool = True):
    """bfloat16 autocast on CUDA when amp, on CPU when cpu_bf16 and the CPU has bf16 instructions; else a no-op."""
    device = torch.device(device)
    if device.type == "cuda" and amp and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


