"""Write a synthetic dataset in the official Algonauts 2023 layout so the whole pipeline runs without the download.

Real ROI masks (bundled copy in demo_assets/, or a folder of real masks), procedurally drawn photo-like images
of faces, bodies, places, words and objects, and voxel responses from a known ground-truth model per ROI family
(edge energy in retinotopic receptive fields for early ROIs, category area for category ROIs, mixtures for the
streams) plus noise of varying SNR; the per-voxel noise ceiling and the per-image categories are saved too.
"""
# ---- OPTIONS (override with --name=value or --config=FILE.json) ----
out_dir = "demo_data"        # the synthetic dataset is written here (official Algonauts 2023 layout + imagefolder/)
subjects = [1, 2]            # NSD subjects (1-8) whose real vertex counts and ROI masks are used
n_train_images = 600         # training images (with fMRI) per subject
n_test_images = 20           # challenge-style test images (no fMRI) per subject
image_px = 425               # side of the square RGB PNGs in pixels (NSD / Algonauts: 425)
shared_fraction = 0.25       # fraction of each subject's training images seen by all subjects (as NSD's shared ones)
noise_level = 1.0            # scales the sd of the fMRI noise (0 = noiseless, 2 = twice as noisy)
imagefolder_per_class = 40   # images per class in out_dir/imagefolder/<class>/ (for classification probes)
imagefolder_px = 128         # side of the ImageFolder PNGs in pixels
seed = 0                     # one seed for images, voxel tuning and noise (same seed -> identical dataset)
mask_source = ""             # "" = bundled copy of the real masks (demo_assets/); else a folder of subjXX folders
rebuild_mask_bundle = False  # true: rebuild demo_assets/ from mask_source (maintainers, once) and stop
overwrite = False            # true: replace an existing complete dataset in out_dir
workers = 0                  # processes drawing and encoding images (0 = one per CPU core)
# ---------------------------------------------------------------------
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

import options
import outputs
import utils

ASSETS_DIR = Path(__file__).resolve().parent / "demo_assets"  # bundled copy of the real ROI masks
SHARED_MASKS = Path(__file__).resolve().parent.parent / "shared" / "algonauts_roi_masks"  # the originals, if here
_CATEGORIES = ("faces", "bodies", "places", "words", "objects")  # label code = index + 1 (0 = background)
_N_ORIENT = 4        # orientation channels of the edge-energy features
_GRAY_PX = 64        # edge energy is computed on a grayscale copy of this size
_GRID = 16           # features are pooled on a _GRID x _GRID retinotopic grid
_NSD_IDS = 73000     # NSD image ids used: 1 .. 72999 (utils.make_split splits by id below 73000)


# ---------------------------------------------------------------------------------------------
# The bundled copy of the real ROI masks (demo_assets/roi_masks.npz + roi_mappings.json).
# ---------------------------------------------------------------------------------------------


def _subject_mask_dir(source: Path, subject: int) -> Path:
    """A subject's mask folder in a mask-only tree (subjXX/) or a full download (subjXX/roi_masks/)."""
    subject_dir = source / utils.subject_dir_name(subject)
    return subject_dir / "roi_masks" if (subject_dir / "roi_masks").is_dir() else subject_dir


def read_mask_folder(source, subjects=None):
    """Real masks from a folder of subjXX mask folders (or a full download).

    Returns ({subject: {hemi: {family: int64 labels}}}, {subject: {family: {id: name}}}).
    """
    source = Path(source)
    if not source.is_dir():
        raise options.DataError(f"{source}: mask folder not found; expected subj01.. folders of "
                              "{lh,rh}.<family>_challenge_space.npy and mapping_<family>.npy files")
    if subjects is None:
        subjects = sorted(int(p.name[4:]) for p in source.iterdir() if p.name[:4] == "subj" and p.name[4:].isdigit())
    masks, mappings = {}, {}
    for subject in subjects:
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
                raise options.DataError(f"{roi_dir}: {hemi} masks of different lengths {sorted(lengths)}; expected one "
                                      "vertex count per hemisphere")
    if not masks:
        raise options.DataError(f"{source}: no subjXX mask folders found")
    return masks, mappings


def save_mask_bundle(masks, mappings, bundle_dir=ASSETS_DIR, config=None) -> tuple[Path, Path]:
    """Write masks as int8 arrays in roi_masks.npz (keys 'subj01/lh.floc-faces') and the mappings as JSON."""
    bundle_dir = Path(bundle_dir)
    arrays = {}
    for subject, by_hemi in masks.items():
        for hemi, by_family in by_hemi.items():
            for family, labels in by_family.items():
                if labels.min(initial=0) < -128 or labels.max(initial=0) > 127:
                    raise options.DataError(f"subject {subject} {hemi}.{family}: labels outside int8 range")
                arrays[f"{utils.subject_dir_name(subject)}/{hemi}.{family}"] = labels.astype(np.int8)
    as_json = {s: {fam: {str(k): v for k, v in m.items()} for fam, m in by_fam.items()}
               for s, by_fam in mappings.items()}
    common = next(iter(as_json.values()))
    # One family -> {id: name} table when every subject has the same mappings (they do), else one per subject.
    table = common if all(m == common for m in as_json.values()) else {
        utils.subject_dir_name(s): m for s, m in as_json.items()}
    npz_path = outputs.save_npz(bundle_dir / "roi_masks.npz", arrays, config)
    json_path = outputs.save_json(bundle_dir / "roi_mappings.json", table, config)
    return npz_path, json_path


def load_mask_bundle(bundle_dir=ASSETS_DIR, subjects=None):
    """The bundled masks -> ({subject: {hemi: {family: int64 labels}}}, {subject: {family: {id: name}}})."""
    bundle_dir = Path(bundle_dir)
    npz_path, json_path = bundle_dir / "roi_masks.npz", bundle_dir / "roi_mappings.json"
    for path in (npz_path, json_path):
        if not path.is_file():
            raise options.DataError(f"{path}: bundled ROI masks not found; rebuild with --rebuild_mask_bundle=true "
                                  "--mask_source=<folder of real masks>, or pass --mask_source")
    table = json.loads(json_path.read_text())
    masks: dict = {}
    with np.load(npz_path, allow_pickle=False) as npz:
        for key in npz.files:
            subject_name, rest = key.split("/")
            hemi, family = rest.split(".", 1)
            subject = int(subject_name[4:])
            if subjects is not None and subject not in subjects:
                continue
            masks.setdefault(subject, {}).setdefault(hemi, {})[family] = npz[key].astype(np.int64)
    missing = sorted(set(subjects or ()) - set(masks))
    if missing:
        raise options.DataError(f"{npz_path}: no masks of subject(s) {missing}; bundled: "
                              + ", ".join(str(s) for s in sorted(_bundle_subjects(npz_path))))
    mappings = {}
    for subject in masks:
        by_family = table.get(utils.subject_dir_name(subject), table)
        mappings[subject] = {fam: {int(k): v for k, v in by_family[fam].items()} for fam in utils.ROI_FAMILIES}
    masks = {s: {h: {f: masks[s][h][f] for f in utils.ROI_FAMILIES} for h in utils.HEMISPHERES}
             for s in sorted(masks)}
    return masks, mappings


REAL_TRAIN_IMAGES = {1: 9841, 2: 9841, 3: 9082, 4: 8779, 5: 9841, 6: 9082, 7: 9841, 8: 8779}  # per NSD subject


def real_sweep_jobs(min_voxels: int) -> dict:
    """Per real subject: (training images, ROI models over both hemispheres with >= min_voxels), from the bundle."""
    masks, mappings = load_mask_bundle()
    jobs = {}
    for subject in sorted(masks):
        count = sum(1 for hemi in utils.HEMISPHERES for family, labels in masks[subject][hemi].items()
                    for roi_id, name in mappings[subject][family].items()
                    if roi_id and name != "Unknown" and np.count_nonzero(labels == roi_id) >= min_voxels)
        jobs[subject] = (REAL_TRAIN_IMAGES[subject], count)
    return jobs


def _bundle_subjects(npz_path) -> set:
    with np.load(npz_path, allow_pickle=False) as npz:
        return {int(k.split("/")[0][4:]) for k in npz.files}


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


# ---------------------------------------------------------------------------------------------
# Procedural photo-like images: textured or scene backgrounds with faces, bodies, words and objects.
# ---------------------------------------------------------------------------------------------

_SKIN = np.array([(255, 224, 189), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)])
_HAIR = np.array([(20, 15, 10), (60, 40, 20), (120, 80, 40), (200, 170, 90), (140, 40, 20), (150, 150, 150)])
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@lru_cache(maxsize=256)
def _font(px: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=max(int(px), 4))


class _Canvas:
    """Draws each shape on the RGB image and, with its category code, on the label image."""

    def __init__(self, img, labels, rng):
        from PIL import ImageDraw
        self.rgb, self.lab, self.rng, self.code = ImageDraw.Draw(img), ImageDraw.Draw(labels), rng, 0
        self.size = img.size[0]

    def colour(self, base=None, jitter=25):
        base = self.rng.integers(0, 256, 3) if base is None else np.asarray(base)
        return tuple(int(v) for v in np.clip(base + self.rng.integers(-jitter, jitter + 1, 3), 0, 255))

    def ellipse(self, box, fill, label=True):
        self.rgb.ellipse(box, fill=fill)
        if label:
            self.lab.ellipse(box, fill=self.code)

    def polygon(self, points, fill, label=True):
        self.rgb.polygon(points, fill=fill)
        if label:
            self.lab.polygon(points, fill=self.code)

    def rectangle(self, box, fill, label=True):
        self.rgb.rectangle(box, fill=fill)
        if label:
            self.lab.rectangle(box, fill=self.code)

    def line(self, points, fill, width, label=True):
        width = max(int(width), 1)
        self.rgb.line(points, fill=fill, width=width, joint="curve")
        if label:
            self.lab.line(points, fill=self.code, width=width, joint="curve")


def _ordered_box(x0, y0, x1, y1):
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _draw_face(c: _Canvas, cx, cy, s):
    """A frontal face of height s: hair, ears, head, eyes, brows, nose, mouth."""
    rng = c.rng
    skin = c.colour(_SKIN[rng.integers(len(_SKIN))], 12)
    hair = c.colour(_HAIR[rng.integers(len(_HAIR))], 12)
    dark = tuple(int(v * 0.7) for v in skin)
    yaw = rng.uniform(-0.08, 0.08) * s
    if rng.random() < 0.85:
        c.ellipse((cx - 0.43 * s, cy - 0.58 * s, cx + 0.43 * s, cy + rng.uniform(0.0, 0.45) * s), hair)
    for side in (-1, 1):
        c.ellipse(_ordered_box(cx + side * 0.33 * s, cy - 0.1 * s, cx + side * 0.42 * s, cy + 0.1 * s), skin)
    c.ellipse((cx - 0.36 * s, cy - 0.5 * s, cx + 0.36 * s, cy + 0.5 * s), skin)
    if rng.random() < 0.7:
        c.rgb.chord((cx - 0.37 * s, cy - 0.53 * s, cx + 0.37 * s, cy - 0.05 * s), 180, 360, fill=hair)
    iris = c.colour((60, 60, 60), 50)
    for side in (-1, 1):
        ex, ey = cx + yaw + side * 0.15 * s, cy - 0.06 * s
        c.rgb.ellipse((ex - 0.08 * s, ey - 0.045 * s, ex + 0.08 * s, ey + 0.045 * s), fill=(245, 245, 240))
        c.rgb.ellipse((ex - 0.035 * s, ey - 0.035 * s, ex + 0.035 * s, ey + 0.035 * s), fill=iris)
        c.rgb.line((ex - 0.09 * s, ey - 0.09 * s, ex + 0.09 * s, ey - 0.1 * s), fill=hair,
                   width=max(int(0.025 * s), 1))
    c.rgb.line((cx + yaw, cy - 0.02 * s, cx + yaw + 0.035 * s, cy + 0.12 * s, cx + yaw - 0.03 * s, cy + 0.14 * s),
               fill=dark, width=max(int(0.02 * s), 1))
    mouth = c.colour((170, 60, 60), 30)
    open_mouth = rng.uniform(0.03, 0.1) * s
    c.rgb.chord((cx + yaw - 0.12 * s, cy + 0.22 * s - open_mouth, cx + yaw + 0.12 * s, cy + 0.28 * s + open_mouth),
                0, 180, fill=mouth)


def _draw_body(c: _Canvas, cx, cy, s):
    """A headless body of height s in a random pose (like fLoc body stimuli): torso, arms, legs, hands, shoes."""
    rng = c.rng
    skin = c.colour(_SKIN[rng.integers(len(_SKIN))], 12)
    shirt, pants, shoes = c.colour(), c.colour(), c.colour((40, 35, 30), 20)
    top, hip = cy - 0.42 * s, cy + 0.02 * s
    c.rectangle((cx - 0.04 * s, top - 0.06 * s, cx + 0.04 * s, top + 0.02 * s), skin)
    for side in (-1, 1):  # legs first so the torso covers the hips
        knee = (cx + side * rng.uniform(0.04, 0.16) * s, hip + rng.uniform(0.2, 0.26) * s)
        foot = (knee[0] + side * rng.uniform(-0.04, 0.1) * s, hip + rng.uniform(0.42, 0.48) * s)
        c.line([(cx + side * 0.07 * s, hip), knee, foot], pants, 0.1 * s)
        c.ellipse(_ordered_box(foot[0] - 0.06 * s, foot[1] - 0.03 * s, foot[0] + side * 0.09 * s,
                               foot[1] + 0.04 * s), shoes)
    c.polygon([(cx - 0.17 * s, top), (cx + 0.17 * s, top), (cx + 0.13 * s, hip + 0.04 * s),
               (cx - 0.13 * s, hip + 0.04 * s)], shirt)
    for side in (-1, 1):
        shoulder = (cx + side * 0.16 * s, top + 0.04 * s)
        angle = rng.uniform(-0.4, 2.2)  # 0 = hanging down, pi/2 = sideways, > pi/2 = raised
        elbow = (shoulder[0] + side * np.sin(angle) * 0.2 * s, shoulder[1] + np.cos(angle) * 0.2 * s)
        bend = angle + rng.uniform(-0.3, 1.2)
        hand = (elbow[0] + side * np.sin(bend) * 0.18 * s, elbow[1] + np.cos(bend) * 0.18 * s)
        c.line([shoulder, elbow], shirt, 0.075 * s)
        c.line([elbow, hand], skin, 0.06 * s)
        c.ellipse((hand[0] - 0.04 * s, hand[1] - 0.04 * s, hand[0] + 0.04 * s, hand[1] + 0.04 * s), skin)


def _draw_words(c: _Canvas, cx, cy, s):
    """One or two random letter strings, on a sign plate or outlined on the background; labelled by their box."""
    rng = c.rng
    lines = ["".join(rng.choice(list(_LETTERS), rng.integers(3, 9))) for _ in range(rng.integers(1, 3))]
    font = _font(int(s * rng.uniform(0.25, 0.4)))
    text = "\n".join(lines)
    box = c.rgb.multiline_textbbox((cx, cy), text, font=font, anchor="mm", align="center")
    width = c.size
    if box[2] - box[0] < 0.9 * width:  # keep the text inside the image where it fits
        cx += max(0.05 * width - box[0], 0) - max(box[2] - 0.95 * width, 0)
        box = c.rgb.multiline_textbbox((cx, cy), text, font=font, anchor="mm", align="center")
    ink = (20, 20, 20) if rng.random() < 0.6 else c.colour()
    pad = 0.06 * s
    plate = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
    if rng.random() < 0.6:
        paper = c.colour((235, 235, 225), 20)
        c.rectangle(plate, paper)
        ink = (20, 20, 20) if sum(ink) > 500 else ink
        c.rgb.multiline_text((cx, cy), text, font=font, fill=ink, anchor="mm", align="center")
    else:
        c.lab.rectangle(plate, fill=c.code)
        outline = (255, 255, 255) if sum(ink) < 384 else (0, 0, 0)
        c.rgb.multiline_text((cx, cy), text, font=font, fill=ink, anchor="mm", align="center",
                             stroke_width=max(int(0.015 * s), 1), stroke_fill=outline)


def _draw_object(c: _Canvas, cx, cy, s):
    """A man-made or natural object of size s: ball, mug, car, bottle, box, star or fruit."""
    rng = c.rng
    col = c.colour()
    dark = tuple(int(v * 0.6) for v in col)
    kind = rng.integers(7)
    if kind == 0:  # ball with a highlight
        c.ellipse((cx - 0.4 * s, cy - 0.4 * s, cx + 0.4 * s, cy + 0.4 * s), col)
        c.rgb.ellipse((cx - 0.22 * s, cy - 0.25 * s, cx - 0.05 * s, cy - 0.1 * s), fill=(250, 250, 250))
    elif kind == 1:  # mug
        c.rgb.arc((cx + 0.1 * s, cy - 0.2 * s, cx + 0.45 * s, cy + 0.2 * s), 270, 90, fill=dark,
                  width=max(int(0.06 * s), 1))
        c.lab.ellipse((cx + 0.1 * s, cy - 0.2 * s, cx + 0.45 * s, cy + 0.2 * s), fill=c.code)
        c.rectangle((cx - 0.3 * s, cy - 0.35 * s, cx + 0.25 * s, cy + 0.35 * s), col)
        c.rgb.ellipse((cx - 0.3 * s, cy - 0.42 * s, cx + 0.25 * s, cy - 0.28 * s), fill=dark)
    elif kind == 2:  # car
        c.polygon([(cx - 0.25 * s, cy - 0.1 * s), (cx - 0.15 * s, cy - 0.3 * s), (cx + 0.18 * s, cy - 0.3 * s),
                   (cx + 0.3 * s, cy - 0.1 * s)], col)
        c.rgb.polygon([(cx - 0.19 * s, cy - 0.12 * s), (cx - 0.12 * s, cy - 0.26 * s), (cx + 0.15 * s, cy - 0.26 * s),
                       (cx + 0.24 * s, cy - 0.12 * s)], fill=(170, 200, 220))
        c.rectangle((cx - 0.5 * s, cy - 0.12 * s, cx + 0.5 * s, cy + 0.12 * s), col)
        for wx in (-0.3, 0.3):
            c.ellipse((cx + (wx - 0.11) * s, cy + 0.02 * s, cx + (wx + 0.11) * s, cy + 0.24 * s), (25, 25, 25))
    elif kind == 3:  # bottle
        c.rectangle((cx - 0.05 * s, cy - 0.5 * s, cx + 0.05 * s, cy - 0.2 * s), col)
        c.polygon([(cx - 0.05 * s, cy - 0.25 * s), (cx + 0.05 * s, cy - 0.25 * s), (cx + 0.16 * s, cy - 0.1 * s),
                   (cx - 0.16 * s, cy - 0.1 * s)], col)
        c.rectangle((cx - 0.16 * s, cy - 0.1 * s, cx + 0.16 * s, cy + 0.5 * s), col)
        c.rgb.rectangle((cx - 0.16 * s, cy + 0.05 * s, cx + 0.16 * s, cy + 0.25 * s), fill=c.colour())
    elif kind == 4:  # box in perspective: three faces
        d = 0.18 * s
        front = [(cx - 0.3 * s, cy - 0.2 * s), (cx + 0.2 * s, cy - 0.2 * s), (cx + 0.2 * s, cy + 0.35 * s),
                 (cx - 0.3 * s, cy + 0.35 * s)]
        c.polygon(front, col)
        c.polygon([front[0], (front[0][0] + d, front[0][1] - d), (front[1][0] + d, front[1][1] - d), front[1]],
                  tuple(min(int(v * 1.3), 255) for v in col))
        c.polygon([front[1], (front[1][0] + d, front[1][1] - d), (front[2][0] + d, front[2][1] - d), front[2]], dark)
    elif kind == 5:  # star
        angles = np.arange(10) * np.pi / 5 + rng.uniform(0, np.pi)
        radii = np.where(np.arange(10) % 2 == 0, 0.45 * s, 0.2 * s)
        c.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), col)
    else:  # fruit with a stalk and a leaf
        c.ellipse((cx - 0.35 * s, cy - 0.3 * s, cx + 0.35 * s, cy + 0.4 * s), col)
        c.line([(cx, cy - 0.3 * s), (cx + 0.05 * s, cy - 0.48 * s)], (90, 60, 30), 0.04 * s)
        c.ellipse((cx + 0.05 * s, cy - 0.48 * s, cx + 0.3 * s, cy - 0.36 * s), c.colour((60, 140, 50), 20))


_DRAW = {"faces": _draw_face, "bodies": _draw_body, "words": _draw_words, "objects": _draw_object}


def _texture_background(rng, size: int):
    """Gradient + low-frequency colour noise, with oriented stripes and low-contrast clutter on some images."""
    from PIL import Image
    low = 24
    yy, xx = np.mgrid[0:low, 0:low] / (low - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / 1.42 + 0.5
    c1, c2 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    field = c1 + t[..., None] * (c2 - c1)
    blobs = Image.fromarray(rng.uniform(0, 255, (5, 5, 3)).astype(np.uint8)).resize((low, low), Image.BICUBIC)
    blobs = np.asarray(blobs, dtype=np.float64)
    field = field + rng.uniform(0.1, 0.5) * (blobs - 127.5)
    grey = field.mean(-1, keepdims=True)
    field = grey + rng.uniform(0.25, 0.8) * (field - grey)  # muted colours, as in photographs
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    from PIL import ImageDraw
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a patch of oriented stripes
        theta, spacing = rng.uniform(0, np.pi), rng.uniform(0.02, 0.08) * size
        cx, cy, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.6) * size
        stripe = tuple(int(v) for v in np.clip(np.asarray(img.getpixel((int(cx) % size, int(cy) % size)))
                                                + rng.uniform(-60, 60, 3), 0, 255))
        offsets = np.arange(-r, r, spacing)
        u, v = np.cos(theta), np.sin(theta)
        for o in offsets:
            half = np.sqrt(max(r * r - o * o, 0.0))
            draw.line((cx - v * o - u * half, cy + u * o - v * half, cx - v * o + u * half, cy + u * o + v * half),
                      fill=stripe, width=max(int(spacing / 3), 1))
    for _ in range(rng.integers(0, 25)):  # clutter: small low-contrast shapes (no category)
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.01, 0.06) * size
        base = np.asarray(img.getpixel((int(x) % size, int(y) % size)))
        fill = tuple(int(v) for v in np.clip(base + rng.uniform(-50, 50, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r * rng.uniform(0.3, 1.5)),
                                                                 fill=fill)
    return img


def _scene_background(rng, size: int, draw_code: int):
    """An outdoor (sky, horizon, hills, buildings, road) or indoor (walls, floor, door, windows) scene."""
    from PIL import Image, ImageDraw
    s = size
    img = Image.new("RGB", (s, s))
    labels = Image.new("L", (s, s), draw_code)
    draw = ImageDraw.Draw(img)
    def jit(base, j=20):
        return tuple(int(v) for v in np.clip(np.asarray(base) + rng.uniform(-j, j, 3), 0, 255))
    if rng.random() < 0.6:  # outdoor
        horizon = rng.uniform(0.35, 0.65) * s
        sky_top, sky_low = jit((90, 140, 210), 40), jit((190, 210, 235), 25)
        rows = np.linspace(0, 1, 32)[:, None, None]
        sky = (np.asarray(sky_top) * (1 - rows) + np.asarray(sky_low) * rows).astype(np.uint8)
        img.paste(Image.fromarray(np.repeat(sky, 2, axis=1)).resize((s, int(horizon) + 1), Image.BILINEAR), (0, 0))
        ground = jit((90, 130, 60) if rng.random() < 0.5 else (140, 130, 110), 30)
        draw.rectangle((0, horizon, s, s), fill=ground)
        hills = np.sort(rng.uniform(0, s, 6))
        draw.polygon([(0, horizon)] + [(x, horizon - rng.uniform(0.02, 0.15) * s) for x in hills] + [(s, horizon)],
                     fill=jit((80, 100, 90), 25))
        x = rng.uniform(-0.1, 0.2) * s
        while x < s:  # a row of buildings with window grids (rectilinear structure)
            w, h = rng.uniform(0.08, 0.25) * s, rng.uniform(0.1, 0.4) * s
            if rng.random() < 0.7:
                wall = jit((150, 140, 130), 60)
                draw.rectangle((x, horizon - h, x + w, horizon), fill=wall)
                glass = jit((60, 70, 90), 30)
                step = max(0.03 * s, 3)
                for wy in np.arange(horizon - h + step / 2, horizon - step, step):
                    for wx in np.arange(x + step / 3, x + w - step / 2, step):
                        draw.rectangle((wx, wy, wx + step / 2, wy + step / 2), fill=glass)
            x += w + rng.uniform(0, 0.1) * s
        if rng.random() < 0.6:  # a road receding to the horizon
            vx = rng.uniform(0.3, 0.7) * s
            draw.polygon([(vx - 0.01 * s, horizon), (vx + 0.01 * s, horizon), (s * rng.uniform(0.7, 1.0), s),
                          (s * rng.uniform(0.0, 0.3), s)], fill=jit((70, 70, 75), 15))
    else:  # indoor room in one-point perspective
        vx, vy = rng.uniform(0.35, 0.65) * s, rng.uniform(0.35, 0.6) * s
        bw, bh = rng.uniform(0.3, 0.5) * s, rng.uniform(0.3, 0.5) * s
        back = (vx - bw / 2, vy - bh / 2, vx + bw / 2, vy + bh / 2)
        wall = jit((200, 190, 170), 40)
        draw.rectangle((0, 0, s, s), fill=tuple(int(v * 0.85) for v in wall))  # side walls
        ceiling = [(0, 0), (s, 0), (back[2], back[1]), (back[0], back[1])]
        draw.polygon(ceiling, fill=jit((230, 230, 225), 15))
        draw.polygon([(0, s), (s, s), (back[2], back[3]), (back[0], back[3])], fill=jit((130, 95, 60), 30))  # floor
        draw.rectangle(back, fill=wall)
        for k in range(1, 6):  # floor boards converging to the vanishing point
            fx = k * s / 6
            draw.line((fx, s, back[0] + (back[2] - back[0]) * k / 6, back[3]), fill=(90, 65, 40),
                      width=max(s // 200, 1))
        if rng.random() < 0.7:  # a window or door in the back wall
            wx0 = rng.uniform(back[0], back[2] - bw * 0.3)
            bottom = back[3] - (0 if rng.random() < 0.5 else bh * 0.3)
            draw.rectangle((wx0, back[1] + bh * 0.15, wx0 + bw * 0.3, bottom), fill=jit((150, 190, 230), 30),
                           outline=(60, 50, 40), width=max(s // 100, 1))
    return img, labels


def render_image(rng, size: int, scene: bool | None = None, objects=None):
    """Draw one image -> (PIL RGB image, uint8 label image: category code per pixel).

    scene: a place (scene background) or a textured background (None = random); objects: a list of
    (category, relative size) to draw (None = 0-3 random objects at random positions and sizes).
    """
    from PIL import Image, ImageFilter
    if scene is None:
        scene = rng.random() < 0.35
    if scene:
        img, labels = _scene_background(rng, size, _CATEGORIES.index("places") + 1)
    else:
        img, labels = _texture_background(rng, size), Image.new("L", (size, size), 0)
    if objects is None:
        n_objects = rng.choice(4, p=(0.45, 0.35, 0.15, 0.05) if scene else (0.15, 0.45, 0.3, 0.1))
        cats = rng.choice(["faces", "bodies", "words", "objects"], n_objects, p=(0.3, 0.25, 0.2, 0.25))
        objects = [(str(cat), rng.uniform(0.15, 0.55)) for cat in cats]
    canvas = _Canvas(img, labels, rng)
    for cat, rel_size in objects:
        s = rel_size * size
        cx, cy = rng.uniform(0.5 * s, size - 0.5 * s), rng.uniform(0.5 * s, size - 0.5 * s)
        canvas.code = _CATEGORIES.index(cat) + 1
        _DRAW[cat](canvas, cx, cy, s)
    img = img.filter(ImageFilter.GaussianBlur(0.6 * size / 425))  # photographic softness
    grain = rng.uniform(1.0, 4.0) * rng.standard_normal((size, size, 1), dtype=np.float32)
    pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), labels


def _encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_task(task):
    """Render one image, write its PNG to every destination, and return its model features (if asked)."""
    from PIL import Image
    entropy, size, destinations, kwargs, want_features = task
    img, labels = render_image(np.random.default_rng(entropy), size, **kwargs)
    data = _encode_png(img)
    for path in destinations:
        path.write_bytes(data)
    if not want_features:
        return None
    gray = np.asarray(img.convert("L").resize((_GRAY_PX, _GRAY_PX), Image.BOX), dtype=np.float32) / 255.0
    lab = np.asarray(labels)
    coverage = np.stack([np.asarray(Image.fromarray(((lab == k + 1) * 255).astype(np.uint8)).resize(
        (_GRID, _GRID), Image.BOX), dtype=np.float32) / 255.0 for k in range(len(_CATEGORIES))])
    area = np.array([(lab == k + 1).mean() for k in range(len(_CATEGORIES))], dtype=np.float32)
    return gray, coverage, area


def render_many(tasks, workers: int, desc: str):
    """Run _render_task over tasks in worker processes (drawing holds the GIL), results in task order."""
    from tqdm import tqdm
    if workers <= 1 or len(tasks) < 8:
        return [_render_task(t) for t in tqdm(tasks, desc=desc, unit="img")]
    import multiprocessing
    # fork: workers inherit this module as it is (also when it was imported, e.g. by the tests)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(tqdm(pool.map(_render_task, tasks, chunksize=8), total=len(tasks), desc=desc, unit="img"))


# ---------------------------------------------------------------------------------------------
# Ground truth: image features -> voxel signals (by ROI family) -> noisy z-scored responses.
# ---------------------------------------------------------------------------------------------


def gabor_energy(gray: np.ndarray, chunk: int = 128) -> np.ndarray:
    """N x H x W grayscale -> N x _N_ORIENT x _GRID x _GRID local oriented-edge energy (quadrature Gabor pairs)."""
    wavelength, half = 6.0, 8
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    envelope = np.exp(-(xx ** 2 + yy ** 2) / (2 * (0.5 * wavelength) ** 2))
    kernels = []
    for theta in np.arange(_N_ORIENT) * np.pi / _N_ORIENT:
        phase = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / wavelength
        even, odd = envelope * np.cos(phase), envelope * np.sin(phase)
        kernels += [even - envelope * even.sum() / envelope.sum(), odd]  # zero-mean: no response to flat luminance
    n, h, w = gray.shape
    size = (h + 2 * half, w + 2 * half)
    kernel_ft = np.fft.rfft2(np.stack(kernels).astype(np.float32), s=size)  # 2*O x ...
    pool = h // _GRID
    out = np.empty((n, _N_ORIENT, _GRID, _GRID), dtype=np.float32)
    for start in range(0, n, chunk):
        # reflect-padded circular convolution: the rows/columns past 2*half never wrap around
        block = np.pad(gray[start:start + chunk], ((0, 0), (half, half), (half, half)), mode="reflect")
        resp = np.fft.irfft2(np.fft.rfft2(block)[:, None] * kernel_ft, s=size)[..., 2 * half:, 2 * half:]
        energy = resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2
        energy = energy.reshape(len(block), _N_ORIENT, _GRID, pool, _GRID, pool).mean(axis=(3, 5))
        out[start:start + chunk] = np.sqrt(energy)
    return out


def image_features(edges: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Edge energy (N x O x G x G) and category coverage (N x C x G x G) -> N x (O + C) x G*G model features."""
    edges = edges.reshape(len(edges), _N_ORIENT, -1)
    cats = np.sqrt(coverage.reshape(len(coverage), len(_CATEGORIES), -1))  # compressive: size-tolerant category drive
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
    w = np.zeros((n, 1 + len(_CATEGORIES)))
    for key, value in spec.items():
        if key == "dirichlet":
            cols = [1 + _CATEGORIES.index(c) for c in value]
            w[:, cols] += rng.dirichlet(np.full(len(value), 0.5), n)
        else:
            w[:, 0 if key == "edges" else 1 + _CATEGORIES.index(key)] += value
    return w * rng.lognormal(0.0, 0.3, w.shape)


def voxel_tuning(labels: dict, mapping: dict, hemi: str, rng) -> dict:
    """Each vertex's ground-truth tuning from its ROI memberships (vectorised per ROI).

    Returns {'orient': V x O, 'category': V x (1 + C) [edges, categories], 'centre': V x 2 (x, y in image
    units, y down), 'sigma': V, 'nc0': V, 'kind': V str ('prf', 'floc', 'stream', 'none')}.
    """
    n = len(next(iter(labels.values())))
    contra = 1.0 if hemi == "lh" else -1.0  # the left hemisphere sees the right visual field
    weights = np.zeros((n, 1 + len(_CATEGORIES)))
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
            weights[idx, 1 + _CATEGORIES.index("objects")] += 0.2
        kind[idx] = "prf"
    preferred = rng.uniform(0, np.pi, n)
    thetas = np.arange(_N_ORIENT) * np.pi / _N_ORIENT
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
    grid = ((np.arange(_GRID) + 0.5) / _GRID).astype(np.float32)
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
    if need > _NSD_IDS - 1:
        raise options.DataError(f"{need} distinct images asked for; NSD has {_NSD_IDS - 1} ids to give "
                              "(lower n_train_images, n_test_images or the number of subjects)")
    pool = np.random.default_rng([seed, 0]).choice(np.arange(1, _NSD_IDS), need, replace=False)
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


def generate_dataset(out: Path, opts: dict, masks: dict, mappings: dict) -> dict:
    """Write the whole dataset under out (an empty folder); return a summary."""
    subjects = [int(s) for s in opts["subjects"]]
    workers = opts.get("workers") or os.cpu_count() or 1
    seed = int(opts["seed"])
    train_ids, test_ids = allocate_nsd_ids(subjects, opts["n_train_images"], opts["n_test_images"],
                                           opts["shared_fraction"], seed)
    # Training images: one render per NSD id, written into every subject that saw it.
    destinations: dict = {}
    for subject in subjects:
        s2 = utils.subject_dir_name(subject)
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
        test_dir = out / utils.subject_dir_name(subject) / "test_split" / "test_images"
        test_dir.mkdir(parents=True)
        test_tasks += [([seed, 1, int(nsd)], opts["image_px"], [test_dir / f"test-{row + 1:04d}_nsd-{nsd:05d}.png"],
                        {}, False) for row, nsd in enumerate(test_ids[subject])]
    if test_tasks:
        render_many(test_tasks, workers, "drawing test images")
    # fMRI, noise ceilings, ROI masks and labels per subject.
    n_vertices = {}
    for subject in subjects:
        s2 = utils.subject_dir_name(subject)
        rows = np.array([row_of[int(nsd)] for nsd in train_ids[subject]])
        write_roi_masks(masks, mappings, subject, out / s2 / "roi_masks")
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
            "categories": list(_CATEGORIES),
            "images": names,
            "nsd_ids": train_ids[subject].tolist(),
            "area": np.round(area[rows], 5).tolist(),  # fraction of the image each category covers (visible pixels)
            "present": (area[rows] > 0).astype(int).tolist(),
        }, opts, subject=subject, note="ground-truth categories of each training image (row order of the fMRI)")
    # A small ImageFolder of single-category images for classification probes.
    folder_tasks = []
    for c, cat in enumerate(_CATEGORIES if opts["imagefolder_per_class"] else ()):
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
        "n_vertices": {utils.subject_dir_name(s): {h: n_vertices[(s, h)] for h in utils.HEMISPHERES}
                       for s in subjects},
        "categories": list(_CATEGORIES),
        "imagefolder_per_class": opts["imagefolder_per_class"],
        "category_image_fraction": dict(zip(_CATEGORIES, np.round((area > 0).mean(0), 3).tolist())),
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
        masks, mappings = read_mask_folder(opts["mask_source"], subjects)
    else:
        masks, mappings = load_mask_bundle(ASSETS_DIR, subjects)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = generate_dataset(tmp, opts, masks, mappings)
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


if __name__ == "__main__":
    config = options.apply_options(globals())
    started = time.time()
    if rebuild_mask_bundle:
        if not mask_source:
            raise options.DataError("--rebuild_mask_bundle=true needs --mask_source=<folder of subjXX mask folders>")
        real_masks, real_mappings = read_mask_folder(mask_source)
        npz_file, json_file = save_mask_bundle(real_masks, real_mappings, ASSETS_DIR, config)
        print(f"wrote {npz_file} ({npz_file.stat().st_size / 1024:.0f} KB) and {json_file} for subjects "
              f"{sorted(real_masks)} from {mask_source}")
        sys.exit(0)
    dataset_dir, info = build(config)
    if info is None:
        print(f"{dataset_dir}: a complete demo dataset is already there (pass --overwrite=true to rebuild)")
        sys.exit(0)
    print(f"wrote a synthetic Algonauts-2023-style dataset to {dataset_dir} in {time.time() - started:.0f} s")
    print(f"  subjects {info['subjects']}: {info['n_train_images']} training images each "
          f"({info['n_shared_images']} shared), {info['n_test_images']} test images, {info['image_px']} px")
    for s2, counts in info["n_vertices"].items():
        print(f"  {s2}: " + ", ".join(f"{h} {v} vertices" for h, v in counts.items()))
    print(f"  imagefolder: {info['imagefolder_per_class']} images per class ({', '.join(info['categories'])}) "
          f"in {dataset_dir / 'imagefolder'}")
    print(f"  use it with --data_dir={dataset_dir}")
