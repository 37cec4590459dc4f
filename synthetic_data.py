"""The synthetic dataset: ground-truth voxel tuning by ROI family, simulated fMRI, the dataset writer.

Also synthetic encoding data (features -> responses with a planted signal) for tests and benchmarks.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

import mask_bundle
import options
import outputs
import paths
import utils
from synthetic_images import CATEGORIES, GRID, render_many

N_ORIENT = 4        # orientation channels of the edge-energy features
NSD_IDS = 73000     # NSD image ids used: 1 .. 72999 (utils.make_split splits by id below 73000)


# ---------------------------------------------------------------------------------------------
# Ground truth: image features -> voxel signals (by ROI family) -> noisy z-scored responses.
# ---------------------------------------------------------------------------------------------


def gabor_energy(gray: np.ndarray, chunk: int = 128) -> np.ndarray:
    """N x H x W grayscale -> N x N_ORIENT x GRID x GRID local oriented-edge energy (quadrature Gabor pairs)."""
    wavelength, half = 6.0, 8
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    envelope = np.exp(-(xx ** 2 + yy ** 2) / (2 * (0.5 * wavelength) ** 2))
    kernels = []
    for theta in np.arange(N_ORIENT) * np.pi / N_ORIENT:
        phase = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / wavelength
        even, odd = envelope * np.cos(phase), envelope * np.sin(phase)
        kernels += [even - envelope * even.sum() / envelope.sum(), odd]  # zero-mean: no response to flat luminance
    n, h, w = gray.shape
    size = (h + 2 * half, w + 2 * half)
    kernel_ft = np.fft.rfft2(np.stack(kernels).astype(np.float32), s=size)  # 2*O x ...
    pool = h // GRID
    out = np.empty((n, N_ORIENT, GRID, GRID), dtype=np.float32)
    for start in range(0, n, chunk):
        # reflect-padded circular convolution: the rows/columns past 2*half never wrap around
        block = np.pad(gray[start:start + chunk], ((0, 0), (half, half), (half, half)), mode="reflect")
        resp = np.fft.irfft2(np.fft.rfft2(block)[:, None] * kernel_ft, s=size)[..., 2 * half:, 2 * half:]
        energy = resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2
        energy = energy.reshape(len(block), N_ORIENT, GRID, pool, GRID, pool).mean(axis=(3, 5))
        out[start:start + chunk] = np.sqrt(energy)
    return out


def image_features(edges: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Edge energy (N x O x G x G) and category coverage (N x C x G x G) -> N x (O + C) x G*G model features."""
    edges = edges.reshape(len(edges), N_ORIENT, -1)
    cats = np.sqrt(coverage.reshape(len(coverage), len(CATEGORIES), -1))  # compressive: size-tolerant category drive
    edges = edges / max(float(edges.std()), 1e-8)
    # per category: a scene fills the background while a body covers little of it, yet both drive their ROIs
    cats = cats / np.maximum(cats.std(axis=(0, 2), keepdims=True), 1e-8)
    return np.concatenate([edges, cats], axis=1).astype(np.float32)


# Category weights of each category-ROI family and each stream (edges weight separate); the rest get a
# random weak mixture. Negative weights: category ROIs are suppressed by other categories, as in fLoc data.
_FLOC_WEIGHTS = {
    "floc-faces": {"faces": 1.0, "bodies": 0.2, "places": -0.1, "objects": 0.05, "edges": 0.1},
    "floc-bodies": {"bodies": 1.0, "faces": 0.2, "places": -0.1, "objects": 0.15, "edges": 0.1},
    "floc-places": {"places": 1.0, "objects": 0.1, "faces": -0.1, "bodies": -0.1, "edges": 0.25},
    "floc-words": {"words": 1.0, "objects": 0.1, "places": -0.1, "faces": 0.05, "edges": 0.15},
}
_STREAM_WEIGHTS = {
    "early": {"edges": 1.0},
    "midventral": {"edges": 0.6, "objects": 0.3, "faces": 0.2, "places": 0.2},
    "midlateral": {"edges": 0.6, "bodies": 0.3, "objects": 0.3},
    "midparietal": {"edges": 0.7, "places": 0.2, "objects": 0.2},
    "ventral": {"edges": 0.15, "dirichlet": ("faces", "bodies", "places", "words", "objects")},
    "lateral": {"edges": 0.2, "dirichlet": ("bodies", "faces", "objects")},
    "parietal": {"edges": 0.4, "places": 0.2, "objects": 0.2},
}
# (RF sd at the fovea, growth of the RF sd with eccentricity) per early visual area, in image widths.
_RF_SIZE = {"V1": (0.03, 0.1), "V2": (0.04, 0.15), "V3": (0.05, 0.2), "hV4": (0.08, 0.3)}
# Beta(a, b) of the noise ceiling by the highest-ranked kind of ROI a vertex is in (mean 0.6, 0.44, 0.33, 0.13).
_NC_BETA = {"prf": (6.0, 4.0), "floc": (4.0, 5.0), "stream": (2.5, 5.0), "none": (1.2, 8.0)}


def _weight_rows(spec: dict, n: int, rng) -> np.ndarray:
    """n x (1 + C) weights [edges, faces, bodies, places, words, objects] from a spec, jittered per vertex."""
    w = np.zeros((n, 1 + len(CATEGORIES)))
    for key, value in spec.items():
        if key == "dirichlet":
            cols = [1 + CATEGORIES.index(c) for c in value]
            w[:, cols] += rng.dirichlet(np.full(len(value), 0.5), n)
        else:
            w[:, 0 if key == "edges" else 1 + CATEGORIES.index(key)] += value
    return w * rng.lognormal(0.0, 0.3, w.shape)


def voxel_tuning(labels: dict, mapping: dict, hemi: str, rng) -> dict:
    """Each vertex's ground-truth tuning from its ROI memberships (vectorised per ROI).

    Returns {'orient': V x O, 'category': V x (1 + C) [edges, categories], 'centre': V x 2 (x, y in image
    units, y down), 'sigma': V, 'nc0': V, 'kind': V str ('prf', 'floc', 'stream', 'none')}.
    """
    n = len(next(iter(labels.values())))
    contra = 1.0 if hemi == "lh" else -1.0  # the left hemisphere sees the right visual field
    weights = np.zeros((n, 1 + len(CATEGORIES)))
    kind = np.full(n, "none", dtype=object)
    # Defaults (streams / no ROI): broad contralateral receptive fields, random weak tuning.
    centre = np.column_stack([0.5 + contra * np.abs(rng.normal(0.1, 0.1, n)), 0.5 + rng.normal(0, 0.15, n)])
    sigma = rng.uniform(0.25, 0.45, n)
    weights += 0.3 * rng.normal(size=weights.shape)
    in_stream = np.zeros(n, bool)
    for roi_id, name in mapping["streams"].items():
        idx = np.flatnonzero(labels["streams"] == roi_id)
        if name not in _STREAM_WEIGHTS or not len(idx):
            continue
        in_stream[idx] = True
        kind[idx] = "stream"
        weights[idx] = _weight_rows(_STREAM_WEIGHTS[name], len(idx), rng)
        if name.startswith("mid") or name == "early":
            sigma[idx] = rng.uniform(0.08, 0.2, len(idx)) if name == "early" else rng.uniform(0.15, 0.3, len(idx))
    in_floc = np.zeros(n, bool)
    for family, spec in _FLOC_WEIGHTS.items():
        for roi_id, name in mapping[family].items():
            idx = np.flatnonzero(labels[family] == roi_id)
            if roi_id == 0 or not len(idx):
                continue
            # overlapping category ROIs add up; the stream a vertex is in adds a half-weight mixture
            weights[idx] = np.where(in_floc[idx, None], weights[idx], 0.5 * weights[idx] * in_stream[idx, None])
            weights[idx] += _weight_rows(spec, len(idx), rng)
            in_floc[idx] = True
            kind[idx] = "floc"
            centre[idx, 0] = 0.5 + contra * np.abs(rng.normal(0.05, 0.08, len(idx)))
            centre[idx, 1] = 0.5 + rng.normal(0, 0.1, len(idx))
            sigma[idx] = rng.uniform(0.2, 0.4, len(idx))
    for roi_id, name in mapping["prf-visualrois"].items():
        idx = np.flatnonzero(labels["prf-visualrois"] == roi_id)
        if roi_id == 0 or not len(idx):
            continue
        area = name[:-1] if name.endswith(("v", "d")) else name
        upper = not name.endswith("d")  # ventral areas (and hV4) map the upper visual field, dorsal the lower
        ecc = 0.45 * rng.beta(1.3, 2.5, len(idx))  # biased to the fovea, as cortical magnification
        polar = rng.uniform(0.02, np.pi / 2 - 0.02, len(idx))
        centre[idx, 0] = 0.5 + contra * ecc * np.cos(polar)
        centre[idx, 1] = 0.5 + (-1 if upper else 1) * ecc * np.sin(polar)
        base, slope = _RF_SIZE[area]
        sigma[idx] = base + slope * ecc
        weights[idx] = 0.3 * weights[idx] * in_floc[idx, None]  # category ROIs overlapping V3/hV4 keep a little
        weights[idx, 0] += rng.lognormal(0.0, 0.2, len(idx))
        if area == "hV4":
            weights[idx, 1 + CATEGORIES.index("objects")] += 0.2
        kind[idx] = "prf"
    preferred = rng.uniform(0, np.pi, n)
    thetas = np.arange(N_ORIENT) * np.pi / N_ORIENT
    orient = np.exp(1.5 * np.cos(2 * (thetas[None] - preferred[:, None])))
    orient /= orient.sum(1, keepdims=True)
    nc0 = np.empty(n)
    for name, (a, b) in _NC_BETA.items():
        idx = np.flatnonzero(kind == name)
        nc0[idx] = rng.beta(a, b, len(idx))
    return {"orient": orient, "category": weights, "centre": centre, "sigma": sigma, "nc0": nc0, "kind": kind}


def voxel_signals(features: np.ndarray, tuning: dict, chunk: int = 2048) -> np.ndarray:
    """N x K x P features and per-vertex tuning -> N x V noiseless signals (each column z-scored).

    signal[n, v] = sum_k channel_weight[v, k] * sum_p rf[v, p] * features[n, k, p], rf a normalised Gaussian.
    """
    n, k, p = features.shape
    grid = ((np.arange(GRID) + 0.5) / GRID).astype(np.float32)
    gx, gy = np.meshgrid(grid, grid)
    gx, gy = gx.ravel(), gy.ravel()
    stacked = features.reshape(n * k, p).astype(np.float32)
    n_vertices = len(tuning["sigma"])
    out = np.empty((n, n_vertices), dtype=np.float32)
    for start in range(0, n_vertices, chunk):
        sl = slice(start, start + chunk)
        cx, cy = tuning["centre"][sl, 0:1].astype(np.float32), tuning["centre"][sl, 1:2].astype(np.float32)
        sd = tuning["sigma"][sl, None].astype(np.float32)
        rf = np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * sd ** 2))
        rf /= rf.sum(1, keepdims=True)
        cat = tuning["category"][sl]
        channel = np.concatenate([cat[:, :1] * tuning["orient"][sl], cat[:, 1:]], axis=1).astype(np.float32)
        pooled = (stacked @ rf.T).reshape(n, k, -1)  # N x K x v: each feature channel seen through each RF
        out[:, sl] = np.einsum("nkv,vk->nv", pooled, channel)
    out -= out.mean(0)
    out /= np.maximum(out.std(0), np.float32(1e-8))
    return out


def simulate_fmri(features: np.ndarray, tuning: dict, noise_level: float, rng,
                  shared_noise: float = 0.2, n_noise_factors: int = 5):
    """Signals + noise (part shared across vertices, as in fMRI) at each vertex's SNR -> (N x V float32, ceiling V).

    The noise ceiling is var(signal) / (var(signal) + var(noise)) of the generating model.
    """
    signal = voxel_signals(features, tuning)
    n, v = signal.shape
    loadings = rng.normal(size=(n_noise_factors, v))
    loadings /= np.linalg.norm(loadings, axis=0)
    noise = (np.sqrt(shared_noise) * (rng.normal(size=(n, n_noise_factors)) @ loadings)).astype(np.float32)
    noise += np.float32(np.sqrt(1 - shared_noise)) * rng.standard_normal((n, v), dtype=np.float32)
    nc0 = tuning["nc0"]
    signal_sd, noise_sd = np.sqrt(nc0), np.sqrt(1 - nc0) * noise_level
    fmri = signal * signal_sd.astype(np.float32) + noise * noise_sd.astype(np.float32)
    fmri -= fmri.mean(0)
    fmri /= np.maximum(fmri.std(0), np.float32(1e-8))  # z-scored per vertex, like the released betas
    noise_ceiling = signal_sd ** 2 / (signal_sd ** 2 + noise_sd ** 2)
    return fmri.astype(np.float32, copy=False), noise_ceiling.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Synthetic encoding data (features -> responses) for tests and benchmark.py.
# ---------------------------------------------------------------------------------------------


def make_synthetic_encoding_data(n_train: int = 800, n_val: int = 200, n_test: int = 300, n_features: int = 100,
                                 n_voxels: int = 500, rank: int = 20, seed: int = 0) -> dict:
    """Features and responses with a planted low-rank linear signal (float32 arrays).

    Features mix `rank` latent factors with unequal scales (unnormalised, spread-out eigenvalues);
    each voxel reads the latents with its own signal strength (some none), so the best alpha varies.
    Returns X_train, Y_train, X_val, Y_val, X_test, Y_test.
    """
    rng = np.random.default_rng(seed)
    n_all = n_train + n_val + n_test
    latents = rng.standard_normal((n_all, rank), dtype=np.float32)
    mixing = rng.standard_normal((rank, n_features), dtype=np.float32)
    scales = np.logspace(0, -2, n_features).astype(np.float32)
    X = (latents @ mixing + rng.standard_normal((n_all, n_features), dtype=np.float32)) * scales + 0.5
    readout = rng.standard_normal((rank, n_voxels), dtype=np.float32) / np.float32(np.sqrt(rank))
    readout *= np.linspace(0.0, 1.0, n_voxels, dtype=np.float32)  # signal strength 0 .. 1 across voxels
    Y = latents @ readout
    for start in range(0, n_all, 2048):  # add noise in row blocks to avoid a second full-size temporary
        Y[start:start + 2048] += rng.standard_normal((min(2048, n_all - start), n_voxels), dtype=np.float32)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    out = {}
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:]):
        out[f"X_{name}"], out[f"Y_{name}"] = X[lo:hi], Y[lo:hi]
    return out


# ---------------------------------------------------------------------------------------------
# The dataset.
# ---------------------------------------------------------------------------------------------


def allocate_nsd_ids(subjects, n_train: int, n_test: int, shared_fraction: float, seed: int):
    """Sorted NSD ids per subject: a block shared by all subjects + distinct ones; test ids distinct from all."""
    n_shared = int(round(shared_fraction * n_train)) if len(subjects) > 1 else 0
    need = n_shared + len(subjects) * (n_train - n_shared + n_test)
    if need > NSD_IDS - 1:
        raise options.DataError(f"{need} distinct images asked for; NSD has {NSD_IDS - 1} ids to give "
                                "(lower n_train_images, n_test_images or the number of subjects)")
    pool = np.random.default_rng([seed, 0]).choice(np.arange(1, NSD_IDS), need, replace=False)
    shared, rest = pool[:n_shared], pool[n_shared:]
    train, test = {}, {}
    for k, subject in enumerate(subjects):
        own = rest[k * (n_train - n_shared + n_test):(k + 1) * (n_train - n_shared + n_test)]
        train[subject] = np.sort(np.concatenate([shared, own[:n_train - n_shared]]))
        test[subject] = np.sort(own[n_train - n_shared:])
    return train, test


def _check_options(opts: dict) -> None:
    for name in ("n_train_images", "imagefolder_per_class"):
        if opts[name] < (1 if name == "n_train_images" else 0):
            raise options.DataError(f"--{name}={opts[name]}: expected a positive number")
    if opts["n_test_images"] < 0:
        raise options.DataError(f"--n_test_images={opts['n_test_images']}: expected 0 or more")
    for name in ("image_px", "imagefolder_px"):
        if opts[name] < 32:
            raise options.DataError(f"--{name}={opts[name]}: expected at least 32 pixels")
    if not 0 <= opts["shared_fraction"] <= 1 or opts["noise_level"] < 0:
        raise options.DataError("--shared_fraction must be in 0..1 and --noise_level >= 0")
    if not opts["subjects"] or len(set(opts["subjects"])) != len(opts["subjects"]):
        raise options.DataError(f"--subjects={opts['subjects']}: expected distinct subject numbers (1-8)")


def generate_dataset(out: Path, opts: dict, masks: dict, mappings: dict, fsaverage_masks: dict) -> dict:
    """Write the whole dataset under out (an empty folder); return a summary."""
    subjects = [int(s) for s in opts["subjects"]]
    workers = opts.get("workers") or os.cpu_count() or 1
    seed = int(opts["seed"])
    train_ids, test_ids = allocate_nsd_ids(subjects, opts["n_train_images"], opts["n_test_images"],
                                           opts["shared_fraction"], seed)
    # Training images: one render per NSD id, written into every subject that saw it.
    destinations: dict = {}
    for subject in subjects:
        s2 = paths.subject_dir_name(subject)
        img_dir = out / s2 / "training_split" / "training_images"
        img_dir.mkdir(parents=True)
        for row, nsd in enumerate(train_ids[subject]):
            destinations.setdefault(int(nsd), []).append(img_dir / f"train-{row + 1:04d}_nsd-{nsd:05d}.png")
    unique_ids = sorted(destinations)
    results = render_many([([seed, 1, nsd], opts["image_px"], destinations[nsd], {}, True) for nsd in unique_ids],
                          workers, "drawing training images")
    row_of = {nsd: i for i, nsd in enumerate(unique_ids)}
    gray = np.stack([r[0] for r in results])
    coverage = np.stack([r[1] for r in results])
    area = np.stack([r[2] for r in results])
    del results
    features = image_features(gabor_energy(gray), coverage)
    # Test images (no fMRI, as in the challenge).
    test_tasks = []
    for subject in subjects if opts["n_test_images"] else []:
        test_dir = out / paths.subject_dir_name(subject) / "test_split" / "test_images"
        test_dir.mkdir(parents=True)
        test_tasks += [([seed, 1, int(nsd)], opts["image_px"], [test_dir / f"test-{row + 1:04d}_nsd-{nsd:05d}.png"],
                        {}, False) for row, nsd in enumerate(test_ids[subject])]
    if test_tasks:
        render_many(test_tasks, workers, "drawing test images")
    # fMRI, noise ceilings, ROI masks and labels per subject.
    n_vertices = {}
    for subject in subjects:
        s2 = paths.subject_dir_name(subject)
        rows = np.array([row_of[int(nsd)] for nsd in train_ids[subject]])
        mask_bundle.write_roi_masks(masks, mappings, subject, out / s2 / "roi_masks")
        mask_bundle.write_fsaverage_masks(fsaverage_masks, subject, out / s2 / "roi_masks")
        for h, hemi in enumerate(utils.HEMISPHERES):
            tuning = voxel_tuning(masks[subject][hemi], mappings[subject], hemi,
                                  np.random.default_rng([seed, 2, subject, h]))
            fmri, noise_ceiling = simulate_fmri(features[rows], tuning, opts["noise_level"],
                                                np.random.default_rng([seed, 3, subject, h]))
            outputs.save_npy(out / s2 / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy", fmri, opts,
                             subject=subject, hemi=hemi)
            outputs.save_npy(out / s2 / "noise_ceiling" / f"{hemi}_noise_ceiling.npy", noise_ceiling, opts,
                             subject=subject, hemi=hemi, definition="var(signal) / (var(signal) + var(noise))")
            n_vertices[(subject, hemi)] = fmri.shape[1]
        names = [f"train-{row + 1:04d}_nsd-{nsd:05d}.png" for row, nsd in enumerate(train_ids[subject])]
        outputs.save_json(out / s2 / "demo_labels.json", {
            "categories": list(CATEGORIES),
            "images": names,
            "nsd_ids": train_ids[subject].tolist(),
            "area": np.round(area[rows], 5).tolist(),  # fraction of the image each category covers (visible pixels)
            "present": (area[rows] > 0).astype(int).tolist(),
        }, opts, subject=subject, note="ground-truth categories of each training image (row order of the fMRI)")
    # A small ImageFolder of single-category images for classification probes.
    folder_tasks = []
    for c, cat in enumerate(CATEGORIES if opts["imagefolder_per_class"] else ()):
        class_dir = out / "imagefolder" / cat
        class_dir.mkdir(parents=True)
        for k in range(opts["imagefolder_per_class"]):
            rng_size = np.random.default_rng([seed, 4, c, k]).uniform(0.45, 0.8)
            spec = ({"scene": True, "objects": []} if cat == "places"
                    else {"scene": False, "objects": [(cat, rng_size)]})
            folder_tasks.append(([seed, 5, c, k], opts["imagefolder_px"], [class_dir / f"{cat}_{k + 1:04d}.png"],
                                 spec, False))
    if folder_tasks:
        render_many(folder_tasks, workers, "drawing imagefolder")
    shared = sorted(set.intersection(*[set(train_ids[s].tolist()) for s in subjects])) if len(subjects) > 1 else []
    summary = {
        "subjects": subjects,
        "n_train_images": opts["n_train_images"],
        "n_test_images": opts["n_test_images"],
        "n_shared_images": len(shared),
        "image_px": opts["image_px"],
        "n_vertices": {paths.subject_dir_name(s): {h: n_vertices[(s, h)] for h in utils.HEMISPHERES}
                       for s in subjects},
        "categories": list(CATEGORIES),
        "imagefolder_per_class": opts["imagefolder_per_class"],
        "category_image_fraction": dict(zip(CATEGORIES, np.round((area > 0).mean(0), 3).tolist())),
    }
    outputs.save_json(out / "demo_info.json", summary, opts)
    return summary


def build(opts: dict) -> tuple[Path, dict | None]:
    """Build the dataset in a hidden sibling folder, mark it complete, then swap it into out_dir.

    A run that stops part-way leaves out_dir untouched; a complete dataset is kept unless overwrite.
    Returns (out_dir, summary or None when skipped).
    """
    out = Path(opts["out_dir"])
    if (out / ".complete").is_file() and not opts["overwrite"]:
        return out, None
    if out.exists() and not opts["overwrite"]:
        raise options.DataError(f"{out}: exists but is not a complete demo dataset (no .complete marker); pass "
                                "--overwrite=true to replace it or choose another --out_dir")
    _check_options(opts)
    subjects = [int(s) for s in opts["subjects"]]
    if opts["mask_source"]:
        masks, mappings = mask_bundle.read_mask_folder(opts["mask_source"], subjects)
        fsaverage_masks = mask_bundle.read_fsaverage_masks(opts["mask_source"], subjects)
    else:
        masks, mappings = mask_bundle.load_mask_bundle(mask_bundle.ASSETS_DIR, subjects)
        fsaverage_masks = mask_bundle.load_fsaverage_bundle(mask_bundle.ASSETS_DIR, subjects)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = generate_dataset(tmp, opts, masks, mappings, fsaverage_masks)
        outputs.save_text(tmp / ".complete", "complete\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, summary
