"""Procedural photo-like images: textured or scene backgrounds with faces, bodies, words and objects.

Each image comes with a label image (category code per pixel) from which the ground-truth model's inputs are taken.
"""
from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import numpy as np

CATEGORIES = ("faces", "bodies", "places", "words", "objects")  # label code = index + 1 (0 = background)
GRAY_PX = 64        # edge energy is computed on a grayscale copy of this size
GRID = 16           # features are pooled on a GRID x GRID retinotopic grid

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
        img, labels = _scene_background(rng, size, CATEGORIES.index("places") + 1)
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
        canvas.code = CATEGORIES.index(cat) + 1
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
    gray = np.asarray(img.convert("L").resize((GRAY_PX, GRAY_PX), Image.BOX), dtype=np.float32) / 255.0
    lab = np.asarray(labels)
    coverage = np.stack([np.asarray(Image.fromarray(((lab == k + 1) * 255).astype(np.uint8)).resize(
        (GRID, GRID), Image.BOX), dtype=np.float32) / 255.0 for k in range(len(CATEGORIES))])
    area = np.array([(lab == k + 1).mean() for k in range(len(CATEGORIES))], dtype=np.float32)
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
