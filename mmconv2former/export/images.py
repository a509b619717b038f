"""Real images for verification: found on disk (given paths, or the config's
test set) and loaded as the config's test pipeline hands them to the model."""
import os
import os.path as osp
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmengine.config import Config

from ..engine.runtime import innermost_dataset

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def _test_dataset(cfg: Config) -> dict:
    loader = cfg.get('test_dataloader') or cfg.get('val_dataloader') or {}
    return innermost_dataset(loader.get('dataset', {})) or {}


def test_pipeline(cfg: Config) -> Optional[list]:
    """The config's test pipeline up to the packing, without annotation
    loading (what is left turns a file into the image the model sees), or None."""
    pipeline = _test_dataset(cfg).get('pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        return None
    return [t for t in pipeline
            if not str(t.get('type', '')).split('.')[-1].startswith(('LoadAnnotations', 'Pack'))]


def config_images(cfg: Config, limit: int = 4) -> List[str]:
    """Up to ``limit`` images of the config's test set, if they are on disk."""
    ds = _test_dataset(cfg)
    prefix = ds.get('data_prefix') or ''
    if isinstance(prefix, dict):
        prefix = prefix.get('img_path', prefix.get('img', ''))
    folder = osp.join(ds.get('data_root') or '', prefix if isinstance(prefix, str) else '')
    found: List[str] = []
    if folder and osp.isdir(folder):
        for root, dirs, files in os.walk(folder):  # class sub-folders for mmpretrain
            dirs.sort()
            found += [osp.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
            if len(found) >= limit:
                break
    return found[:limit]


def find_images(paths: Sequence[str]) -> List[str]:
    """Image files among ``paths`` (files, or directories read non-recursively)."""
    found = []
    for path in paths:
        if osp.isdir(path):
            found += sorted(osp.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith(IMAGE_SUFFIXES))
        elif osp.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f'image not found: {path!r}')
    return found


def load_images(cfg: Config, library: str, paths: Sequence[str]) -> List[torch.Tensor]:
    """Each image as the config's test pipeline hands it to the model: a
    ``(3, H, W)`` uint8 tensor (BGR as mmcv reads it, resized as the pipeline
    resizes), or the file as mmcv reads it when the config has no pipeline."""
    import mmcv
    from mmengine.dataset import Compose
    from mmengine.registry import DefaultScope

    pipeline = test_pipeline(cfg)
    images = []
    with DefaultScope.overwrite_default_scope(library):  # the pipeline's transforms
        compose = Compose(pipeline) if pipeline else None
        for i, path in enumerate(paths):
            if compose is not None:
                img = compose(dict(img_path=path, img_id=i))['img']
            else:
                img = mmcv.imread(path)
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            images.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))
    return images
