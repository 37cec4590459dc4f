"""Outputs: atomic writes (temp file + rename) with a JSON sidecar of the options that made each file, tables."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import options

META_DIR = "meta"   # each folder's sidecars, out of the way of its tables and figures


def sidecar_path(path) -> Path:
    """The JSON sidecar that records how an output was made: 'meta/<name>.json' in the output's folder."""
    path = Path(path)
    return path.parent / META_DIR / (path.name + ".json")


def read_sidecar(path) -> dict | None:
    """An output's sidecar as a dict (also the older '<name>.meta.json' beside it), or None if it has none."""
    path = Path(path)
    for candidate in (sidecar_path(path), path.with_name(path.name + ".meta.json")):
        try:
            return json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
    return None


def package_versions() -> dict:
    """Versions of the packages a result depends on."""
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchvision", "numpy", "scipy", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def plain(obj, strict: bool = True):
    """Options, metrics and results as plain Python types (numpy scalars and arrays, Paths -> str).

    strict: non-finite floats -> None, as strict JSON needs; strict=False keeps NaN (checkpoints).
    """
    if isinstance(obj, dict):
        return {str(k): plain(v, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, strict) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return plain(obj.item(), strict)
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist(), strict)
    if strict and isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temp path beside path; when the block succeeds it is renamed over path, else deleted."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if _is_write_failure(err):
            raise options.DataError(f"{path}: could not be written ({_write_cause(err, path)}); nothing was "
                                    "left half-written") from None
        raise


def _is_write_failure(err: BaseException) -> bool:
    """An OS error of the write, or torch.save's RuntimeError for one (a full disk reads 'unexpected pos')."""
    text = str(err)
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and (
        "inline_container" in text or "file write failed" in text or "PytorchStreamWriter" in text))


def _write_cause(err: BaseException, path: Path) -> str:
    """The cause in a few words, with the free space of the disk (a full disk is the usual cause)."""
    import errno
    import shutil
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path.cwd())
    free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free on its disk"
    if isinstance(err, OSError) and err.errno == errno.EACCES:
        return f"permission denied; {free}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full; {free}"
    first = (str(err).splitlines() or [type(err).__name__])[0].strip()
    return f"{type(err).__name__}: {first[:160]}; {free}: a full disk is the usual cause"


def atomic_write(path, write_fn, *, mode: str = "wb", suffix: str | None = None) -> Path:
    """Write via write_fn(file) to a temp file in the same folder, then rename over path."""
    with atomic_path(path, suffix or ".tmp") as tmp, open(tmp, mode) as fh:
        write_fn(fh)
    return Path(path)


def write_sidecar(path, options: dict | None = None, **extra) -> Path:
    """Write the sidecar (sidecar_path) with the options, the producing script, time and package versions."""
    meta = {
        "file": Path(path).name,
        "script": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": options or {},
        "packages": package_versions(),
        **extra,
    }
    text = json.dumps(plain(meta), indent=1)
    return atomic_write(sidecar_path(path), lambda f: f.write(text), mode="w")


def save_json(path, obj, options: dict | None = None, **extra) -> Path:
    text = json.dumps(plain(obj), indent=1)
    atomic_write(path, lambda f: f.write(text), mode="w")
    if options is not None:
        write_sidecar(path, options, **extra)
    return Path(path)


def save_npy(path, array, options: dict | None = None, **extra) -> Path:
    atomic_write(path, lambda f: np.save(f, np.asarray(array)), suffix=".tmp.npy")
    if options is not None:
        write_sidecar(path, options, **extra)
    return Path(path)


def save_npz(path, arrays: dict, options: dict | None = None, **extra) -> Path:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays), suffix=".tmp.npz")
    if options is not None:
        write_sidecar(path, options, **extra)
    return Path(path)


def save_text(path, text: str, options: dict | None = None, **extra) -> Path:
    atomic_write(path, lambda f: f.write(text), mode="w")
    if options is not None:
        write_sidecar(path, options, **extra)
    return Path(path)


def save_csv(path, rows: list[dict], options: dict | None = None, **extra) -> Path:
    """Rows of dicts -> CSV (columns from the union of keys, first-seen order)."""
    columns: list = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return save_text(path, buf.getvalue(), options, **extra)


@contextlib.contextmanager
def csv_stream(path, columns):
    """Write rows (dicts with these columns) to a CSV as they come: yields write(rows); the file appears at path
    only when the block succeeds (write its sidecar afterwards)."""
    with atomic_path(path, ".tmp.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        yield lambda rows: writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def save_figure(path, fig, options: dict | None = None, dpi: int = 130, **extra) -> Path:
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), suffix=".tmp.png")
    plt.close(fig)
    if options is not None:
        write_sidecar(path, options, **extra)
    return Path(path)


def _cell(value, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "nan"
        # small p-values stay readable
        return f"{value:.1e}" if 0 < abs(value) < 1e-3 else float_format.format(value)
    return str(value)


def table_columns(rows: list[dict]) -> list:
    """The union of the rows' keys in first-seen order."""
    columns: list = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return columns


def format_table(rows: list[dict], columns=None, float_format: str = "{:.3f}") -> str:
    """Rows of dicts -> aligned text table for the terminal (columns: all keys by default)."""
    if not rows:
        return "(no rows)"
    columns = list(columns) if columns is not None else table_columns(rows)
    body = [[_cell(r.get(c), float_format) for c in columns] for r in rows]
    widths = [max([len(str(c))] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns=None, float_format: str = "{:.3f}") -> str:
    """Rows of dicts -> GitHub Markdown table (non-finite numbers shown as '–')."""
    columns = list(columns) if columns is not None else table_columns(rows)

    def cell(v):
        text = _cell(v, float_format)
        return "–" if text in ("nan", "-") else text
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
