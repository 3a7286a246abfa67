"""Seeded synthetic scenes written in the real ADE20K and Cityscapes on-disk layouts.

The scenes are built so that token compression has something to lose: large textured regions
(sky, walls, roads, buildings: many similar tokens to merge), small objects one to a few 8-pixel
patches in size (people, signs, traffic lights, windows, vases) and thin structures narrower than
a patch (poles 3-6 pixels wide, fences and railings of 3-pixel bars, table legs; wires and lane
marks are "other"/void). Every evaluated class has its own colour, at least 86 RGB units from
every other evaluated class's (void ids get colours of their own too), and its own texture
(stripes, checkers, blotches, dots, speckle, gradients), drawn from a fixed "world" table, so a
small ViT trained from scratch in a few hundred iterations can learn them and a model trained on
one seed generalises to another; every image gets mild illumination changes, blur and noise.
Colour is what tells classes apart, so training on these scenes should leave out hue and
saturation jitter (the dataset key ``photometric: false`` of the default study). Sizes are in units of the image's
short side / 128 (the default study's test scale), so a structure's width in pixels at the
model's input does not depend on the image size.

Files written (``root`` = the dataset root):

* ADE20K (ADEChallengeData2016): ``images/{training,validation}/ADE_{train,val}_%08d.jpg`` and
  ``annotations/.../*.png`` with raw ADE labels (0 = "other", ignored; 1..150 = classes).
* Cityscapes: ``leftImg8bit/{train,val}/<city>/<city>_%06d_000019_leftImg8bit.png``,
  ``gtFine/.../*_gtFine_labelIds.png`` (real labelIds, void ids included) and
  ``*_gtFine_labelTrainIds.png`` written by :func:`segcompress.data.cityscapes.write_train_ids`,
  the same function that converts real Cityscapes.

Each image is drawn from its own generator ``numpy.random.default_rng([seed, split, index])``, so
the same seed gives the same bytes and adding training images does not change the others.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from segcompress.data.cityscapes import (
    EVALUATED_LABEL_IDS, IMAGE_SUFFIX, LABEL_IDS_SUFFIX, write_label_png, write_train_ids,
)

WORLD_SEED = 20240611  # fixes the class appearance table (not the scenes)
JPEG_QUALITY = 92

# ADE20K class ids used by the scenes (1-based, as in the annotation PNGs; names as in mmseg): 30
# of the 150, each frequent enough in a few dozen training images to be learnt.
ADE = {
    "wall": 1, "building": 2, "sky": 3, "floor": 4, "tree": 5, "ceiling": 6, "road": 7, "bed": 8,
    "windowpane": 9, "grass": 10, "cabinet": 11, "sidewalk": 12, "person": 13, "earth": 14, "door": 15,
    "table": 16, "mountain": 17, "plant": 18, "curtain": 19, "chair": 20, "car": 21, "painting": 23,
    "fence": 33, "lamp": 37, "railing": 39, "signboard": 44, "bus": 81, "pole": 94, "vase": 136,
    "traffic light": 137,
}
ADE_OTHER = 0

# Cityscapes labelIds (cityscapesscripts.helpers.labels).
CS = {
    "unlabeled": 0, "ego vehicle": 1, "rectification border": 2, "out of roi": 3, "static": 4,
    "dynamic": 5, "ground": 6, "road": 7, "sidewalk": 8, "parking": 9, "building": 11, "wall": 12,
    "fence": 13, "guard rail": 14, "pole": 17, "polegroup": 18, "traffic light": 19,
    "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23, "person": 24, "rider": 25,
    "car": 26, "truck": 27, "bus": 28, "caravan": 29, "trailer": 30, "train": 31,
    "motorcycle": 32, "bicycle": 33,
}

CITIES = {"train": ("aachen", "bremen", "zurich"), "val": ("frankfurt", "lindau", "munster")}
ADE_SIDES = (128, 224)  # each side of an ADE image is drawn from this range (varied aspect)
CITYSCAPES_SIZE = (128, 256)  # (H, W), the real 2:1 aspect


@dataclass(frozen=True)
class Appearance:
    """How one class looks: base colour, texture kind and its parameters."""

    color: tuple[float, float, float]
    contrast: tuple[float, float, float]
    kind: str
    period: float
    angle: float


# Candidate base colours. The evaluated classes draw theirs from a body-centred cubic lattice
# (a 3-level grid on 35/135/235 plus the centres of its cells): 35 colours at least 86.6 apart
# (sqrt(3) x 50), so up to 35 classes stay that far apart. Ignored ids draw from a finer grid.
_BCC = np.concatenate([
    np.stack(np.meshgrid(*[(35.0, 135.0, 235.0)] * 3, indexing="ij"), -1).reshape(-1, 3),
    np.stack(np.meshgrid(*[(85.0, 185.0)] * 3, indexing="ij"), -1).reshape(-1, 3),
])
_FINE = np.stack(np.meshgrid(*[np.linspace(35.0, 235.0, 9)] * 3, indexing="ij"), -1).reshape(-1, 3)
_KINDS = ("gradient", "stripes", "checker", "blotch", "dots", "speckle")
CONTRAST = (8.0, 20.0)  # texture amplitude range, below half the distance between class colours


def class_colors(n: int, rng: np.random.Generator, candidates: np.ndarray, taken: np.ndarray | None = None) -> np.ndarray:
    """``n`` base colours among ``candidates``, spread by farthest-point sampling, each as far as
    possible from the others and from ``taken`` (colours already given out)."""
    if n > len(candidates):
        raise ValueError(f"at most {len(candidates)} distinct class colours, asked for {n}")
    grid = candidates[rng.permutation(len(candidates))]
    if taken is not None and len(taken):
        dist = np.min(np.linalg.norm(grid[:, None] - taken[None], axis=-1), axis=1)
    else:
        dist = np.full(len(grid), np.inf)  # start from the first candidate after the shuffle
    chosen = []
    for _ in range(n):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(grid - grid[i], axis=1))
        dist[i] = -np.inf
    return grid[chosen]


def appearance_table(class_ids: list[int], layout: str, ignored: tuple[int, ...] = ()) -> dict[int, Appearance]:
    """A fixed appearance for every class id: its own base colour and a texture.

    The evaluated classes get their colours first, at least 86.6 apart (:data:`_BCC`); the
    ``ignored`` ids (void, labels never evaluated) get others, as far from those as possible
    (ignored pixels never enter the loss or the metric, so their colours only need to differ).
    """
    rng = np.random.default_rng([WORLD_SEED, zlib.crc32(layout.encode())])
    evaluated = [c for c in sorted(class_ids) if c not in ignored]
    rest = [c for c in sorted(class_ids) if c in ignored]
    colors = class_colors(len(evaluated), rng, _BCC)
    colors = np.concatenate([colors, class_colors(len(rest), rng, _FINE, taken=colors)]) if rest else colors
    table = {}
    for cid, color in zip(evaluated + rest, colors):
        contrast = rng.uniform(*CONTRAST) * rng.uniform(0.7, 1.0, size=3)
        table[cid] = Appearance(
            color=tuple(float(v) for v in color), contrast=tuple(float(v) for v in contrast),
            kind=_KINDS[int(rng.integers(len(_KINDS)))], period=float(rng.uniform(3.0, 10.0)),
            angle=float(rng.uniform(0, np.pi)),
        )
    return dict(sorted(table.items()))


def _texture(app: Appearance, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Texture values in about [-1, 1] on the grid (yy, xx)."""
    h, w = yy.shape
    p, phase = app.period, rng.uniform(0, 2 * np.pi)
    if app.kind == "gradient":
        low = cv2.resize(rng.normal(size=(3, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        return 0.7 * (yy / h - 0.5) * 2 + 0.3 * low
    if app.kind == "stripes":
        return np.sin(2 * np.pi * (xx * np.cos(app.angle) + yy * np.sin(app.angle)) / p + phase)
    if app.kind == "checker":
        return np.sign(np.sin(2 * np.pi * xx / p + phase) * np.sin(2 * np.pi * yy / p + phase))
    if app.kind == "blotch":
        gh, gw = max(2, int(h / p / 2)), max(2, int(w / p / 2))
        low = cv2.resize(rng.normal(size=(gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        return np.clip(low, -1.5, 1.5)
    if app.kind == "dots":
        return (np.sin(2 * np.pi * xx / p + phase) * np.sin(2 * np.pi * yy / p) > 0.4) * 2.0 - 1.0
    return rng.uniform(-1, 1, size=(h, w))  # speckle


def render(label: np.ndarray, table: dict[int, Appearance], rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image for a raw label map: per-class texture, illumination, blur and noise."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for cid in np.unique(label).tolist():
        app = table[cid]
        mask = label == cid
        tex = _texture(app, rng, yy, xx)[mask]
        color = np.asarray(app.color, np.float32) + rng.normal(0, 5, size=3)
        img[mask] = color + tex[:, None] * np.asarray(app.contrast, np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    gain = rng.uniform(0.9, 1.1)
    cast = rng.normal(0, 4, size=3)
    img = img * gain + cast + rng.normal(0, 5, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -- drawing helpers -----------------------------------------------------------------------------

def _wave(rng: np.random.Generator, w: int, y0: float, amp: float) -> np.ndarray:
    """A wavy horizontal boundary y(x) around ``y0``."""
    x = np.arange(w, dtype=np.float32)
    y = np.full(w, y0, np.float32)
    for f in (1, 2, 5):
        y += amp / f * np.sin(2 * np.pi * f * x / w * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
    return y


def _fill_below(label: np.ndarray, y: np.ndarray, cid: int) -> None:
    rows = np.arange(label.shape[0], dtype=np.float32)[:, None]
    label[rows >= y[None, :]] = cid


def _rect(label: np.ndarray, x0: float, y0: float, x1: float, y1: float, cid: int) -> None:
    cv2.rectangle(label, (int(x0), int(y0)), (int(x1), int(y1)), int(cid), thickness=-1)


def _ellipse(label: np.ndarray, cx: float, cy: float, rx: float, ry: float, cid: int, angle: float = 0) -> None:
    cv2.ellipse(label, (int(cx), int(cy)), (max(1, int(rx)), max(1, int(ry))), angle, 0, 360, int(cid), -1)


def _line(label: np.ndarray, x0: float, y0: float, x1: float, y1: float, cid: int, width: float = 1) -> None:
    cv2.line(label, (int(x0), int(y0)), (int(x1), int(y1)), int(cid), max(1, int(round(width))))


def _blob(label: np.ndarray, rng: np.random.Generator, cx: float, cy: float, r: float, cid: int) -> None:
    """An irregular star-shaped polygon (bushes, rocks, "other" clutter)."""
    n = int(rng.integers(7, 13))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.55, 1.0, n)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
    cv2.fillPoly(label, [pts], int(cid))


def _fence(label: np.ndarray, rng: np.random.Generator, x0: float, x1: float, ytop: float, ybot: float,
           cid: int, s: float) -> None:
    """A lattice of thin bars (3 units wide): two rails and posts every 8-12 units."""
    for y in (ytop, (ytop + ybot) / 2):
        _line(label, x0, y, x1, y, cid, 3 * s)
    for x in np.arange(x0, x1, rng.uniform(8, 12) * s):
        _line(label, x, ytop, x, ybot, cid, 3 * s)


def _depth(y: float, horizon: float, h: int) -> float:
    """Perspective scale (0.7 at the horizon, 1 at the bottom edge)."""
    return float(np.clip(0.7 + 0.3 * (y - horizon) / max(1.0, h - horizon), 0.7, 1.0))


def _pole(label: np.ndarray, rng: np.random.Generator, x: float, ybot: float, s: float, pole: int,
          top: int | None) -> None:
    """A pole 3-6 units wide, with a box (sign, light, lamp) on top unless ``top`` is None."""
    height = rng.uniform(30, 60) * s
    _line(label, x, ybot, x, ybot - height, pole, rng.uniform(3, 6) * s)
    if top is not None:
        bw, bh = rng.uniform(14, 20) * s, rng.uniform(12, 18) * s
        _rect(label, x - bw / 2, ybot - height - bh, x + bw / 2, ybot - height, top)


def _person(label: np.ndarray, rng: np.random.Generator, x: float, ybot: float, s: float, cid: int) -> None:
    hgt = rng.uniform(24, 36) * s
    _rect(label, x - hgt * 0.2, ybot - hgt * 0.8, x + hgt * 0.2, ybot, cid)
    _ellipse(label, x, ybot - hgt * 0.88, hgt * 0.1, hgt * 0.11, cid)


def _vehicle(label: np.ndarray, rng: np.random.Generator, x: float, ybot: float, s: float, cid: int,
             long: bool = False) -> None:
    w = rng.uniform(30, 45) * s * (1.8 if long else 1.0)
    hb = rng.uniform(9, 13) * s * (1.6 if long else 1.0)
    _rect(label, x - w / 2, ybot - hb, x + w / 2, ybot - 2 * s, cid)
    if not long:
        _rect(label, x - w * 0.3, ybot - hb * 1.7, x + w * 0.25, ybot - hb, cid)
    for wx in (x - w * 0.3, x + w * 0.3):
        _ellipse(label, wx, ybot - 2 * s, 3.5 * s, 3.5 * s, cid)


def _two_wheeler(label: np.ndarray, x: float, ybot: float, s: float, cid: int, solid: bool) -> None:
    """Two wheels (rings 3 units wide, or solid) joined by a frame: about 26 x 14 units."""
    r = 6.5 * s
    for dx in (-7, 7):
        cv2.circle(label, (int(x + dx * s), int(ybot - r)), max(3, int(r)), int(cid), -1 if solid else max(2, int(3 * s)))
    _rect(label, x - 7 * s, ybot - r - 2 * s, x + 7 * s, ybot - r + 2 * s, cid)


# -- scenes --------------------------------------------------------------------------------------

def ade_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A raw ADE20K label map (uint8, 0 = other): an outdoor street or an indoor room."""
    return (_ade_outdoor if rng.random() < 0.6 else _ade_indoor)(rng, h, w)


def _ade_outdoor(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = min(h, w) / 128
    label = np.full((h, w), ADE["sky"], np.uint8)
    horizon = rng.uniform(0.35, 0.55) * h
    if rng.random() < 0.5:  # distant mountains
        _fill_below(label, _wave(rng, w, horizon - 0.12 * h, 0.06 * h), ADE["mountain"])
    x = 0.0
    while x < w:  # skyline of buildings / houses / skyscrapers / trees
        bw = rng.uniform(14, 45) * s
        kind = rng.choice(["building", "building", "tree"])
        top = horizon - rng.uniform(0.1, 0.4) * h
        if kind == "tree":
            _blob(label, rng, x + bw / 2, top + bw / 2, bw * 0.6, ADE["tree"])
            _rect(label, x + bw / 2 - 2 * s, top + bw / 2, x + bw / 2 + 2 * s, horizon, ADE["tree"])
        else:
            _rect(label, x, top, x + bw, horizon + 2, ADE[kind])
            if rng.random() < 0.7:  # windows (small objects on the facade)
                for wy in np.arange(top + 4 * s, horizon - 9 * s, 12 * s):
                    for wx in np.arange(x + 3 * s, x + bw - 8 * s, 11 * s):
                        _rect(label, wx, wy, wx + 6 * s, wy + 7 * s, ADE["windowpane"])
        x += bw
    ground = rng.choice(["road", "road", "grass", "earth"])
    _fill_below(label, _wave(rng, w, horizon, 0.02 * h), ADE[ground])
    if ground == "road":  # sidewalk strip and lane markings ("other": ignored thin lines)
        _fill_below(label, _wave(rng, w, horizon + 0.08 * h, 0.01 * h), ADE["sidewalk"])
        _fill_below(label, _wave(rng, w, horizon + 0.18 * h, 0.02 * h), ADE["road"])
        ymark = horizon + rng.uniform(0.3, 0.4) * h
        for mx in np.arange(rng.uniform(0, 20 * s), w, 22 * s):
            _rect(label, mx, ymark, mx + 9 * s, ymark + 2 * s, ADE_OTHER)
    for _ in range(int(rng.integers(0, 3))):  # grass / earth patches
        _blob(label, rng, rng.uniform(0, w), rng.uniform(horizon + 10, h), rng.uniform(10, 30) * s,
              ADE[rng.choice(["grass", "earth"])])
    if rng.random() < 0.6:  # fence or railing along the horizon
        fx0 = rng.uniform(0, w / 2)
        _fence(label, rng, fx0, fx0 + rng.uniform(0.3, 0.6) * w, horizon - 12 * s, horizon + 2,
               ADE["fence"], s)
    for _ in range(int(rng.integers(3, 7))):  # poles with a sign or a light on top
        yb = rng.uniform(horizon + 5, h)
        top = rng.choice([None, ADE["signboard"], ADE["traffic light"]])
        _pole(label, rng, rng.uniform(0, w), yb, _depth(yb, horizon, h) * s, ADE["pole"], top)
    for _ in range(int(rng.integers(1, 4))):  # vehicles
        yb = rng.uniform(horizon + 12, h)
        kind = rng.choice(["car", "car", "bus"])
        _vehicle(label, rng, rng.uniform(0, w), yb, _depth(yb, horizon, h) * s, ADE[kind], long=kind != "car")
    for _ in range(int(rng.integers(3, 9))):  # people
        yb = rng.uniform(horizon + 4, h)
        _person(label, rng, rng.uniform(0, w), yb, _depth(yb, horizon, h) * s, ADE["person"])
    for _ in range(int(rng.integers(0, 3))):  # wires across the sky ("other")
        y0, y1 = rng.uniform(0, horizon * 0.7, 2)
        _line(label, 0, y0, w, y1, ADE_OTHER)
    return label


def _ade_indoor(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = min(h, w) / 128
    label = np.full((h, w), ADE["wall"], np.uint8)
    ceil_y = rng.uniform(0.1, 0.25) * h
    floor_y = rng.uniform(0.6, 0.75) * h
    tilt = rng.uniform(-0.08, 0.08) * h
    rows = np.arange(h)[:, None]
    cols = np.arange(w)[None, :]
    label[rows < ceil_y + tilt * cols / w] = ADE["ceiling"]
    label[rows >= floor_y - tilt * cols / w] = ADE["floor"]
    for _ in range(int(rng.integers(1, 3))):  # windows with 1-px mullions, curtains beside them
        wx, wy = rng.uniform(0, 0.7) * w, rng.uniform(ceil_y + 8, max(ceil_y + 8, floor_y - 40 * s))
        ww, wh = rng.uniform(20, 40) * s, rng.uniform(20, 35) * s
        _rect(label, wx, wy, wx + ww, wy + wh, ADE["windowpane"])
        _line(label, wx + ww / 2, wy, wx + ww / 2, wy + wh, ADE_OTHER)
        _line(label, wx, wy + wh / 2, wx + ww, wy + wh / 2, ADE_OTHER)
        if rng.random() < 0.6:
            _rect(label, wx - 8 * s, wy - 4, wx - 1, floor_y, ADE["curtain"])
    for _ in range(int(rng.integers(0, 3))):  # paintings on the wall
        px, py = rng.uniform(0, w), rng.uniform(ceil_y + 4, floor_y - 20 * s)
        _rect(label, px, py, px + rng.uniform(12, 24) * s, py + rng.uniform(10, 18) * s, ADE["painting"])
    if rng.random() < 0.7:  # a door standing on the floor
        dx = rng.uniform(0, 0.85) * w
        _rect(label, dx, floor_y - rng.uniform(45, 60) * s, dx + 18 * s, floor_y, ADE["door"])
    for _ in range(int(rng.integers(2, 5))):  # furniture
        yb = rng.uniform(floor_y + 5, h)
        xc = rng.uniform(0, w)
        kind = rng.choice(["bed", "cabinet", "table", "chair"])
        fw, fh = rng.uniform(20, 45) * s, rng.uniform(10, 25) * s
        if kind in ("table", "chair"):  # slab on thin legs
            fw = fw * (0.5 if kind == "chair" else 1.0)
            _rect(label, xc - fw / 2, yb - fh, xc + fw / 2, yb - fh + 3 * s, ADE[kind])
            for lx in (xc - fw / 2 + s, xc + fw / 2 - s):
                _line(label, lx, yb - fh, lx, yb, ADE[kind], 2 * s)
            if kind == "chair":
                _rect(label, xc + fw / 2 - 3 * s, yb - fh * 1.8, xc + fw / 2, yb - fh, ADE["chair"])
            else:
                for _ in range(int(rng.integers(1, 3))):  # small things on the table
                    ox = rng.uniform(xc - fw / 2, xc + fw / 2 - 8 * s)
                    _rect(label, ox, yb - fh - rng.uniform(10, 14) * s, ox + 8 * s, yb - fh,
                          ADE[rng.choice(["vase", "lamp"])])
        else:
            if kind == "cabinet":
                fh *= 2.0
            _rect(label, xc - fw / 2, yb - fh, xc + fw / 2, yb, ADE[kind])
    if rng.random() < 0.5:  # railing / bannister of thin bars
        ry = rng.uniform(floor_y - 25 * s, floor_y)
        _fence(label, rng, rng.uniform(0, w / 2), rng.uniform(w / 2, w), ry, floor_y, ADE["railing"], s)
    if rng.random() < 0.8:  # potted plant or floor lamp (pole + shade)
        x = rng.uniform(0, w)
        if rng.random() < 0.5:
            _blob(label, rng, x, floor_y - 8 * s, 10 * s, ADE["plant"])
        else:
            _pole(label, rng, x, rng.uniform(floor_y, h), s * 0.8, ADE["lamp"], ADE["lamp"])
    for _ in range(int(rng.integers(0, 3))):  # clutter: "other"
        _blob(label, rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 8) * s, ADE_OTHER)
    return label


def cityscapes_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A Cityscapes labelIds map (uint8): a street seen from a car, with void regions."""
    s = h / 128
    label = np.full((h, w), CS["sky"], np.uint8)
    horizon = rng.uniform(0.38, 0.5) * h
    x = 0.0
    while x < w:  # buildings, walls and trees along the street
        bw = rng.uniform(18, 55) * s
        kind = rng.choice(["building", "building", "building", "vegetation", "wall"])
        top = horizon - (rng.uniform(0.15, 0.4) * h if kind != "wall" else rng.uniform(10, 20) * s)
        if kind == "vegetation":
            _blob(label, rng, x + bw / 2, top + bw / 3, bw * 0.6, CS["vegetation"])
            _rect(label, x, top + bw / 3, x + bw, horizon + 2, CS["vegetation"])
        else:
            _rect(label, x, top, x + bw, horizon + 2, CS[kind])
        x += bw
    _fill_below(label, _wave(rng, w, horizon, 0.01 * h), CS["sidewalk"])
    # road: a trapezoid widening towards the car
    cx = rng.uniform(0.4, 0.6) * w
    top_half, bot_half = rng.uniform(0.05, 0.15) * w, rng.uniform(0.5, 0.8) * w
    road = np.array([[cx - top_half, horizon], [cx + top_half, horizon], [cx + bot_half, h], [cx - bot_half, h]])
    cv2.fillPoly(label, [road.astype(np.int32)], CS["road"])
    for side in (-1, 1):  # terrain / parking / ground patches beside the road
        if rng.random() < 0.85:
            px = cx + side * rng.uniform(0.35, 0.5) * w
            _blob(label, rng, px, rng.uniform(horizon + 15, h - 10), rng.uniform(15, 30) * s,
                  CS[rng.choice(["terrain", "terrain", "parking", "ground"])])
    if rng.random() < 0.6:  # fence or guard rail at the roadside
        fx0 = rng.uniform(0, w * 0.6)
        if rng.random() < 0.6:
            _fence(label, rng, fx0, fx0 + rng.uniform(0.2, 0.4) * w, horizon - 10 * s, horizon + 2, CS["fence"], s)
        else:
            _line(label, fx0, horizon + 3, fx0 + 0.3 * w, horizon + 3 + 4 * s, CS["guard rail"], 3 * s)
    for _ in range(int(rng.integers(4, 9))):  # poles with signs and lights
        side = rng.choice([-1, 1])
        yb = rng.uniform(horizon + 3, h * 0.85)
        d = _depth(yb, horizon, h)
        x = cx + side * (top_half + (bot_half - top_half) * (yb - horizon) / (h - horizon) + rng.uniform(2, 12) * d * s)
        top = rng.choice([None, CS["traffic sign"], CS["traffic light"]])
        _pole(label, rng, x, yb, d * s, CS[rng.choice(["pole", "pole", "pole", "polegroup"])], top)
    for _ in range(int(rng.integers(3, 8))):  # vehicles on the road
        yb = rng.uniform(horizon + 8, h * 0.9)
        d = _depth(yb, horizon, h)
        kind = rng.choice(["car", "car", "car", "truck", "bus", "train", "caravan", "trailer"],
                          p=[0.15, 0.15, 0.1, 0.15, 0.15, 0.1, 0.1, 0.1])
        _vehicle(label, rng, cx + rng.uniform(-1, 1) * bot_half * d, yb, d * s, CS[kind], long=kind != "car")
    for _ in range(int(rng.integers(4, 10))):  # people, riders, two-wheelers, static/dynamic things
        yb = rng.uniform(horizon + 4, h * 0.9)
        d = _depth(yb, horizon, h)
        x = rng.uniform(0, w)
        kind = rng.choice(["person", "person", "person", "rider", "rider", "bicycle", "motorcycle", "static",
                           "dynamic"])
        if kind in ("person", "rider"):
            _person(label, rng, x, yb - (4 * d * s if kind == "rider" else 0), d * s, CS[kind])
            if kind == "rider":
                _two_wheeler(label, x, yb, d * s, CS["bicycle"], solid=False)
        elif kind in ("bicycle", "motorcycle"):
            _two_wheeler(label, x, yb, d * s, CS[kind], solid=kind == "motorcycle")
        else:
            _rect(label, x, yb - 8 * d * s, x + 8 * d * s, yb, CS[kind])
    if rng.random() < 0.3:  # small unlabeled clutter
        _blob(label, rng, rng.uniform(0, w), rng.uniform(horizon, h), 5 * s, CS["unlabeled"])
    # the ego vehicle's bonnet, the rectification border and out-of-ROI corners (all void)
    _ellipse(label, w / 2, h + 0.02 * h, w * 0.6, rng.uniform(0.06, 0.12) * h, CS["ego vehicle"])
    cv2.fillPoly(label, [np.array([[0, h - 1], [0, h - 10 * s], [10 * s, h - 1]], np.int32)], CS["out of roi"])
    label[:, :1] = CS["rectification border"]
    label[:, -1:] = CS["rectification border"]
    label[-1:, :] = CS["rectification border"]
    return label


# -- writers ------------------------------------------------------------------------------------

ADE_CLASSES = sorted({ADE_OTHER, *ADE.values()})
CS_CLASSES = sorted(CS.values())


def _save_image(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if path.suffix == ".jpg":
        im.save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        im.save(path, format="PNG")


def _write_ade(root: Path, split: str, index: int, rng: np.random.Generator,
               table: dict[int, Appearance]) -> list[Path]:
    folder = "training" if split == "train" else "validation"
    h, w = (int(v) for v in rng.integers(ADE_SIDES[0], ADE_SIDES[1] + 1, size=2))
    label = ade_scene(rng, h, w)
    name = f"ADE_{split}_{index + 1:08d}"
    img_path = root / "images" / folder / f"{name}.jpg"
    ann_path = root / "annotations" / folder / f"{name}.png"
    _save_image(img_path, render(label, table, rng))
    write_label_png(ann_path, label)
    return [img_path, ann_path]


def _write_cityscapes(root: Path, split: str, index: int, rng: np.random.Generator,
                      table: dict[int, Appearance]) -> list[Path]:
    h, w = CITYSCAPES_SIZE
    label = cityscapes_scene(rng, h, w)
    cities = CITIES[split]
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_000019"
    img_path = root / "leftImg8bit" / split / city / f"{stem}{IMAGE_SUFFIX}"
    ids_path = root / "gtFine" / split / city / f"{stem}{LABEL_IDS_SUFFIX}"
    _save_image(img_path, render(label, table, rng))
    write_label_png(ids_path, label)
    return [img_path, ids_path, write_train_ids(ids_path)]  # the same conversion as for real data


_WRITERS: dict[str, tuple[Callable[..., list[Path]], list[int], tuple[int, ...]]] = {
    "ade20k": (_write_ade, ADE_CLASSES, (ADE_OTHER,)),
    "cityscapes": (_write_cityscapes, CS_CLASSES, tuple(c for c in CS_CLASSES if c not in EVALUATED_LABEL_IDS)),
}
LAYOUT_FOLDERS = {"ade20k": ("images", "annotations"), "cityscapes": ("leftImg8bit", "gtFine")}
_SPLIT_CODE = {"train": 0, "val": 1}


def generate(layout: str, root: str | Path, num_train: int = 64, num_val: int = 16, seed: int = 0,
             progress: bool = True) -> list[Path]:
    """Write a synthetic dataset in ``layout``'s on-disk format under ``root``.

    Does not write a manifest and does not remove files (see ``segcompress data`` for both).

    Args:
        layout: ``ade20k`` or ``cityscapes``.
        root: dataset root (the ADEChallengeData2016 folder or the Cityscapes root).
        num_train: training images.
        num_val: validation images.
        seed: scene seed; the same seed writes the same bytes.
        progress: show a progress bar.

    Returns:
        The files written, in order.
    """
    from tqdm import tqdm

    if layout not in _WRITERS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {', '.join(_WRITERS)}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got --num-train {num_train} --num-val {num_val}")
    writer, classes, ignored = _WRITERS[layout]
    table = appearance_table(classes, layout, ignored)
    root = Path(root)
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    written: list[Path] = []
    for split, i in tqdm(jobs, desc=f"synthetic {layout}", unit="img", disable=not progress):
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
        written.extend(writer(root, split, i, rng, table))
    return written
