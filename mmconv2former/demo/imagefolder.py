"""Write the embedded image-classification demo set (an ImageNet-style folder).

    python -m mmconv2former.demo.imagefolder data/shapes_cls

Each image shows one shape (circle, square or triangle) of random size,
colour, shade and rotation on a textured background (the scenes of
:mod:`mmconv2former.demo.shapes`); its class is the shape. Classes are
balanced. Layout, read as is by mmpretrain's ``CustomDataset``::

    data/shapes_cls/
      train/circle/000000.png ...  train/square/...  train/triangle/...
      val/circle/...               val/square/...    val/triangle/...

Deterministic: the same seed and sizes give byte-identical files. A second
call with the same settings finds the set in place and writes nothing.
"""
import argparse
import json
import os
import os.path as osp
import shutil
from typing import Tuple

import numpy as np

from .shapes import SHAPES, make_scene

CLASSES: Tuple[str, ...] = SHAPES


def _object_crop(rng: np.random.Generator, scene_size: int, size: Tuple[int, int]) -> Tuple[np.ndarray, int]:
    """A one-shape scene cropped around its shape and resized to ``size``.

    Whole scenes at demo resolutions leave most shapes a few pixels wide after
    the stride-4 stem; an object-centred crop (the shape spans 55-75 % of its
    side, off-centre by up to a tenth) keeps the task about shape, like an
    ImageNet photo is about its object, and lets a from-scratch model learn
    it in minutes on a CPU.
    """
    from PIL import Image
    while True:
        scene = make_scene(rng, (scene_size, scene_size), max_objects=1)
        if len(scene.labels) == 1:  # a shape too small to draw leaves the scene empty
            break
    ys, xs = np.nonzero(scene.masks[0])
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    side = int(min(scene_size, round(extent / rng.uniform(0.55, 0.75))))
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    cy, cx = cy + rng.uniform(-0.1, 0.1) * side, cx + rng.uniform(-0.1, 0.1) * side
    top = int(np.clip(round(cy - side / 2), 0, scene_size - side))
    left = int(np.clip(round(cx - side / 2), 0, scene_size - side))
    crop = Image.fromarray(scene.image[top:top + side, left:left + side])
    return np.asarray(crop.resize((size[1], size[0]), Image.BILINEAR)), scene.labels[0]


def _split(root: str, split: str, per_class: int, size: Tuple[int, int], seed: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    counts = [0] * len(CLASSES)
    for name in CLASSES:
        os.makedirs(osp.join(root, split, name), exist_ok=True)
    index = 0
    while min(counts) < per_class:
        image, label = _object_crop(rng, 4 * max(size), size)
        if counts[label] >= per_class:  # keep the classes balanced
            continue
        Image.fromarray(image).save(osp.join(root, split, CLASSES[label], f'{index:06d}.png'))
        counts[label] += 1
        index += 1


def generate_imagefolder_demo(root: str = 'data/shapes_cls', num_train: int = 600, num_val: int = 150,
                              size: Tuple[int, int] = (32, 32), seed: int = 0) -> str:
    """Write the demo set under ``root`` (skipped when already there).

    ``num_train`` and ``num_val`` are rounded down to multiples of the three
    classes.
    """
    per_train, per_val = num_train // len(CLASSES), num_val // len(CLASSES)
    if per_train < 1 or per_val < 1:
        raise ValueError(f'need at least {len(CLASSES)} images per split, got {num_train} and {num_val}')
    settings = dict(per_class_train=per_train, per_class_val=per_val, size=list(size), seed=seed, version=2)
    stamp = osp.join(root, 'settings.json')
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return root
    for split in ('train', 'val'):  # a different earlier set must not leave files behind
        if osp.isdir(osp.join(root, split)):
            shutil.rmtree(osp.join(root, split))
    # different seeds per split: validation images are never training images
    _split(root, 'train', per_train, size, seed)
    _split(root, 'val', per_val, size, seed + 10_000)
    with open(stamp, 'w') as f:
        json.dump(settings, f)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', nargs='?', default='data/shapes_cls')
    parser.add_argument('--num-train', type=int, default=600)
    parser.add_argument('--num-val', type=int, default=150)
    parser.add_argument('--size', type=int, nargs=2, default=(32, 32), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    generate_imagefolder_demo(args.root, args.num_train, args.num_val, tuple(args.size), args.seed)
    print(f'image-folder demo set ready under {args.root}')


if __name__ == '__main__':
    main()
