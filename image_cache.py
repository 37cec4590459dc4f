"""Training and challenge images: cheap PNG checks, and PNGs decoded once into memory-mapped uint8 caches."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import paths
from options import DataError
from outputs import atomic_path, sidecar_path, write_sidecar
from paths import subject_dir_name

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_files(image_paths) -> None:
    """Cheap check that each file starts with the PNG signature and ends with the IEND chunk.

    Catches truncated downloads before anything is written; corrupt data inside a file is caught when
    the image cache decodes it.
    """
    for path in image_paths:
        with open(path, "rb") as fh:
            head = fh.read(8)
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 12))
            tail = fh.read(12)
        if head != _PNG_SIGNATURE or tail[4:8] != b"IEND":
            raise DataError(f"{path}: truncated or not a PNG (missing PNG signature or IEND chunk); "
                            "expected a complete PNG image")



def decode_image(path, size: int) -> np.ndarray:
    """One PNG -> 3 x size x size uint8 (RGB, bilinear resize), or a DataError naming the file."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable or truncated image ({err}); expected a valid PNG") from None
    return arr.transpose(2, 0, 1)


def load_image_cache(out_dir, subject: int, image_paths, size: int = 224, tag: str = "train",
                     workers: int | None = None) -> np.ndarray:
    """Memory-map the subject's decoded images, building the cache first if it is missing or stale."""
    from tqdm import tqdm
    path = paths.image_cache_file(out_dir, subject, size, tag)
    key = {"size": size, "images": [Path(p).name for p in image_paths],
           "bytes": [Path(p).stat().st_size for p in image_paths]}
    meta_path = sidecar_path(path)
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("cache_key") == key:
            return np.load(path, mmap_mode="r")
    with atomic_path(path, ".tmp.npy") as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(image_paths), 3, size, size))

        def decode_into(i, out=cache):
            out[i] = decode_image(image_paths[i], size)

        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(tqdm(pool.map(decode_into, range(len(image_paths))), total=len(image_paths),
                      desc=f"decoding {subject_dir_name(subject)} images at {size}px", unit="img"))
        cache.flush()
        del decode_into, cache  # close the memmap before the rename
    write_sidecar(path, {"size": size}, cache_key=key)
    return np.load(path, mmap_mode="r")
