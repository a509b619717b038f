"""Deterministic synthetic "stuff" scenes for the semantic-segmentation demo.

Most of ADE20K's pixels belong to stuff classes (wall, floor, sky, grass,
water, ...) that a model tells apart by local appearance: the texture inside a
region, not the region's outline. These scenes keep that property at demo
scale: a background of one material and a few overlapping regions of others,
each material a texture family whose colours, scale, orientation and shading
are random per region, so neither colour nor brightness gives the class away;
only the pattern does. (The shapes scenes of the detection and classification
demos are the wrong tool here: there the three classes differ only in their
outline, which a from-scratch model does not learn in a few CPU minutes.)
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .shapes import SHAPES, shape_mask, smooth_noise

MATERIALS: Tuple[str, ...] = ('smooth', 'speckle', 'stripes', 'checks', 'dots')


@dataclass
class MaterialScene:
    image: np.ndarray    # (H, W, 3) uint8, RGB
    classes: np.ndarray  # (H, W) int64, index into MATERIALS for every pixel


def _frame(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a randomly rotated and shifted frame."""
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy + rng.uniform(0, 100), xx + rng.uniform(0, 100)
    return xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)


def _pattern(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) mixing weight in [0, 1] between a material's two colours.
    Periodic patterns repeat every 6-14 px (checks: cells of 3.5-7 px), so
    several periods fit in a region and each period spans a few pixels even
    after the stride-2 stem convolution; speckle is the one per-pixel texture."""
    if kind == 'speckle':  # grain of 1-2 px, like gravel or foliage
        grain = int(rng.integers(1, 3))
        cells = rng.random((h // grain + 1, w // grain + 1))
        return np.repeat(np.repeat(cells, grain, 0), grain, 1)[:h, :w]
    u, v = _frame(rng, h, w)
    if kind == 'stripes':
        period = rng.uniform(6, 12)
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    if kind == 'checks':
        cell = rng.uniform(3.5, 7)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    if kind == 'dots':
        period = rng.uniform(7, 11)
        du, dv = u / period - np.round(u / period), v / period - np.round(v / period)
        return (np.hypot(du, dv) <= rng.uniform(0.25, 0.38)).astype(np.float64)
    raise ValueError(f'unknown material {kind!r}; expected one of {MATERIALS}')


def render_material(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float image of one material, filling the whole frame."""
    if kind == 'smooth':  # gradients with no texture, like sky, wall or a painted surface
        image = smooth_noise(rng, h, w, cell=int(rng.integers(12, 33)), low=20, high=235)
    else:
        first = rng.uniform(0, 255, size=3)
        second = rng.uniform(0, 255, size=3)
        # a pattern needs contrast to exist: push a too-similar second colour away
        if np.abs(first - second).max() < 70:
            second = np.where(first < 128, first + 90, first - 90)
        weight = _pattern(kind, rng, h, w)[..., None]
        shading = smooth_noise(rng, h, w, cell=32, low=0.75, high=1.25, channels=1)
        image = (first * (1 - weight) + second * weight) * shading
    return image + rng.normal(0, 4, size=(h, w, 3))


def make_material_scene(rng: np.random.Generator, size: Tuple[int, int] = (96, 96),
                        max_regions: int = 4, min_area: int = 64) -> MaterialScene:
    """One scene: a background material, then 1..``max_regions`` regions
    (circles, squares, triangles, possibly cut by the border) of other
    materials, later ones occluding earlier ones."""
    h, w = size
    background = int(rng.integers(len(MATERIALS)))
    classes = np.full((h, w), background, dtype=np.int64)
    image = render_material(MATERIALS[background], rng, h, w)
    for _ in range(int(rng.integers(1, max_regions + 1))):
        kind = int(rng.choice([k for k in range(len(MATERIALS)) if k != background]))
        r = float(rng.uniform(0.18, 0.38) * min(h, w))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        outline = SHAPES[int(rng.integers(len(SHAPES)))]
        mask = shape_mask(outline, h, w, cy, cx, r, float(rng.uniform(0, 2 * np.pi)))
        if mask.sum() < min_area:
            continue
        image[mask] = render_material(MATERIALS[kind], rng, h, w)[mask]
        classes[mask] = kind
    return MaterialScene(np.clip(image, 0, 255).astype(np.uint8), classes)
