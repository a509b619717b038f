"""Write the embedded ADE20K-format semantic-segmentation demo set.

    python -m mmconv2former.demo.ade data/ade_demo

Layout (ADEChallengeData2016's, so mmseg's ADE pipeline reads it as is)::

    data/ade_demo/
      images/training/000000.jpg ...        images/validation/000000.jpg ...
      annotations/training/000000.png ...   annotations/validation/000000.png ...
      settings.json

Label maps follow ADE20K's convention: value 0 is "unlabelled" and the
classes are 1..K, so the dataset is read with ``reduce_zero_label=True``
(0 -> 255, ignored; k -> k - 1). The classes are the materials of
``materials.py`` (smooth, speckle, stripes, checks, dots): every pixel has one,
as in ADE, where stuff like wall, sky or grass covers most of an image. The
unlabelled 0 is a thin band along every region's outline, where a pixel is
part one material and part another (the "void" border that VOC also draws);
it is neither trained on nor scored.

Deterministic: the same seed and sizes give byte-identical files. A second
call with the same settings finds the set in place and writes nothing.
"""
import argparse
import json
import os
import os.path as osp
import re
from typing import Tuple

import numpy as np

from .materials import MATERIALS, make_material_scene

CLASSES: Tuple[str, ...] = MATERIALS
PALETTE = [(120, 120, 120), (0, 200, 0), (0, 128, 255), (220, 20, 60), (255, 200, 0)]
IGNORE = 0  # ADE's "unlabelled"; 255 after reduce_zero_label
_OWN_FILE = re.compile(r'\d{6}\.(jpg|png)')


def label_map(classes: np.ndarray, border: int = 1) -> np.ndarray:
    """ADE-style uint8 label map from per-pixel class indices (0-based):
    class k is stored as k + 1, and ``IGNORE`` on a band of ``border`` pixels
    on each side of every class change."""
    seg = (classes + 1).astype(np.uint8)
    if border > 0:
        edge = np.zeros(seg.shape, dtype=bool)
        # a pixel whose 4-neighbour has another label lies on an outline
        vertical = seg[1:, :] != seg[:-1, :]
        horizontal = seg[:, 1:] != seg[:, :-1]
        edge[1:, :] |= vertical
        edge[:-1, :] |= vertical
        edge[:, 1:] |= horizontal
        edge[:, :-1] |= horizontal
        for _ in range(border - 1):
            grown = edge.copy()
            grown[1:, :] |= edge[:-1, :]
            grown[:-1, :] |= edge[1:, :]
            grown[:, 1:] |= edge[:, :-1]
            grown[:, :-1] |= edge[:, 1:]
            edge = grown
        seg[edge] = IGNORE
    return seg


def _split(root: str, split: str, count: int, size: Tuple[int, int], seed: int, border: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    image_dir = osp.join(root, 'images', split)
    ann_dir = osp.join(root, 'annotations', split)
    for folder in (image_dir, ann_dir):
        os.makedirs(folder, exist_ok=True)
        # mmseg lists the folders, so files left by a larger earlier set would
        # join this one; only our own names are removed, never a user's files
        for name in os.listdir(folder):
            if _OWN_FILE.fullmatch(name):
                os.remove(osp.join(folder, name))
    for index in range(count):
        scene = make_material_scene(rng, size)
        name = f'{index:06d}'
        # ADE ships JPEG images and PNG label maps; libjpeg output is deterministic
        Image.fromarray(scene.image).save(osp.join(image_dir, name + '.jpg'), quality=95)
        seg = label_map(scene.classes, border)
        Image.fromarray(seg).save(osp.join(ann_dir, name + '.png'))


def generate_ade_demo(root: str = 'data/ade_demo', num_train: int = 400, num_val: int = 80,
                      size: Tuple[int, int] = (96, 96), seed: int = 0, border: int = 1) -> str:
    """Write the demo set under ``root`` (skipped when already there)."""
    settings = dict(num_train=num_train, num_val=num_val, size=list(size), seed=seed,
                    border=border, classes=list(CLASSES), version=2)
    stamp = osp.join(root, 'settings.json')
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return root
        os.remove(stamp)  # a half-written or different set is rewritten in full
    # different seeds per split: validation scenes are never training scenes
    for split, count, split_seed in (('training', num_train, seed),
                                     ('validation', num_val, seed + 10_000)):
        _split(root, split, count, size, split_seed, border)
    with open(stamp, 'w') as f:
        json.dump(settings, f)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', nargs='?', default='data/ade_demo')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=80)
    parser.add_argument('--size', type=int, nargs=2, default=(96, 96), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--border', type=int, default=1, help='unlabelled pixels each side of an outline')
    args = parser.parse_args()
    generate_ade_demo(args.root, args.num_train, args.num_val, tuple(args.size), args.seed, args.border)
    print(f'ADE-format demo set ready under {args.root}')


if __name__ == '__main__':
    main()
