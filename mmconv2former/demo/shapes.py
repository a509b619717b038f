"""Deterministic synthetic scenes shared by the embedded demos.

Each scene is a textured background with a few filled shapes (circle, square,
triangle) of random colour, size and rotation, drawn in order so that later
shapes occlude earlier ones. What each demo writes (COCO instances, ADE-style
label maps, an image folder) is built from the same scenes, so the three tasks
see the same kind of data.
"""
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

SHAPES: Tuple[str, ...] = ('circle', 'square', 'triangle')


@dataclass
class Scene:
    image: np.ndarray                 # (H, W, 3) uint8, RGB
    labels: List[int] = field(default_factory=list)          # index into SHAPES
    masks: List[np.ndarray] = field(default_factory=list)    # visible part, (H, W) bool


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int = 16,
                 low: float = 60, high: float = 200, channels: int = 3) -> np.ndarray:
    """(h, w, channels) float noise that varies over ``cell`` pixels: a random
    grid of values bilinearly interpolated."""
    coarse = rng.uniform(low, high, size=(h // cell + 2, w // cell + 2, channels))
    ys = np.linspace(0, coarse.shape[0] - 1.001, h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    return ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1]
            + fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour noise plus faint stripes: a background that is
    neither flat nor shape-like, so the model must learn shape, not contrast."""
    bg = smooth_noise(rng, h, w)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 14)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    bg = bg + stripes[..., None] + rng.normal(0, 6, size=(h, w, 3))
    return bg


def shape_mask(kind: str, h: int, w: int, cy: float, cx: float, r: float, theta: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if kind == 'circle':
        return dy ** 2 + dx ** 2 <= r ** 2
    # rotate coordinates into the shape's frame
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if kind == 'square':
        half = r * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle with circumradius r: inside all three half-planes
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        normal = 2 * np.pi * k / 3 + np.pi / 2
        inside &= (u * np.cos(normal) + v * np.sin(normal)) <= r * 0.5
    return inside


def make_scene(rng: np.random.Generator, size: Tuple[int, int] = (160, 160),
               max_objects: int = 4, min_visible: float = 0.45) -> Scene:
    """One scene. A shape that would leave an earlier one less than
    ``min_visible`` visible is not drawn, so every drawn shape is annotated
    and occlusion stays partial."""
    h, w = size
    img = _texture(rng, h, w)
    n = int(rng.integers(1, max_objects + 1))
    kinds, full_areas = [], []
    occupancy = np.full((h, w), -1, dtype=np.int32)
    for _ in range(n):
        kind = int(rng.integers(len(SHAPES)))
        r = float(rng.uniform(0.08, 0.24) * min(h, w))
        cy, cx = rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6)
        mask = shape_mask(SHAPES[kind], h, w, cy, cx, r, float(rng.uniform(0, 2 * np.pi)))
        if mask.sum() < 40:
            continue
        trial = np.where(mask, len(kinds), occupancy)
        if any((trial == i).sum() < min_visible * area for i, area in enumerate(full_areas)):
            continue
        colour = rng.uniform(0, 255, size=3)
        # keep shapes distinguishable from the background they sit on
        colour = np.where(np.abs(colour - img[mask].mean(0)) < 50, 255 - colour, colour)
        shade = 1 + 0.15 * (np.mgrid[0:h, 0:w][0] - cy)[mask][:, None] / max(r, 1)
        img[mask] = colour * shade
        occupancy = trial
        kinds.append(kind)
        full_areas.append(int(mask.sum()))
    scene = Scene(np.clip(img, 0, 255).astype(np.uint8))
    for idx, kind in enumerate(kinds):
        scene.labels.append(kind)
        scene.masks.append(occupancy == idx)
    return scene
