"""Write the embedded COCO-format instance-segmentation demo set.

    python -m mmconv2former.demo.coco data/coco_demo

Layout (the standard COCO one, so mmdet's ``CocoDataset`` reads it as is)::

    data/coco_demo/
      annotations/instances_train.json  instances_val.json
      train/000000.png ...              val/000000.png ...

Deterministic: the same seed and sizes give byte-identical files. A second
call with the same settings finds the set in place and writes nothing.
"""
import argparse
import json
import os
import os.path as osp
from typing import Dict, List, Tuple

import numpy as np

from .shapes import SHAPES, make_scene

CLASSES: Tuple[str, ...] = SHAPES


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a binary mask as COCO polygons ([x1, y1, x2, ...])."""
    import cv2  # opencv comes with mmcv; imported here so the package needs only torch
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) >= 3 and cv2.contourArea(contour) >= 4:
            # pixel centres -> pixel corners: +0.5 keeps the polygon's area close to the mask's
            polygons.append([float(v) + 0.5 for v in contour.reshape(-1)])
    return polygons


def _split(root: str, split: str, count: int, size: Tuple[int, int], seed: int) -> Dict:
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(count):
        scene = make_scene(rng, size)
        name = f'{image_id:06d}.png'
        Image.fromarray(scene.image).save(osp.join(root, split, name))
        images.append(dict(id=image_id, file_name=name, height=size[0], width=size[1]))
        for label, mask in zip(scene.labels, scene.masks):
            polygons = mask_to_polygons(mask)
            if not polygons:
                continue
            ys, xs = np.nonzero(mask)
            x0, y0 = float(xs.min()), float(ys.min())
            bbox = [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                                    segmentation=polygons, area=float(mask.sum()), bbox=bbox,
                                    iscrowd=0))
    return dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(CLASSES)])


def generate_coco_demo(root: str = 'data/coco_demo', num_train: int = 240, num_val: int = 60,
                       size: Tuple[int, int] = (160, 160), seed: int = 0) -> str:
    """Write the demo set under ``root`` (skipped when already there)."""
    settings = dict(num_train=num_train, num_val=num_val, size=list(size), seed=seed, version=1)
    stamp = osp.join(root, 'annotations', 'settings.json')
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return root
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    # different seeds per split: validation scenes are never training scenes
    for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 10_000)):
        coco = _split(root, split, count, size, split_seed)
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
    with open(stamp, 'w') as f:
        json.dump(settings, f)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', nargs='?', default='data/coco_demo')
    parser.add_argument('--num-train', type=int, default=240)
    parser.add_argument('--num-val', type=int, default=60)
    parser.add_argument('--size', type=int, nargs=2, default=(160, 160), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    generate_coco_demo(args.root, args.num_train, args.num_val, tuple(args.size), args.seed)
    print(f'COCO demo set ready under {args.root}')


if __name__ == '__main__':
    main()
