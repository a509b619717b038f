"""The model to export: built from its config, loaded from a whole-model
checkpoint, and the input size to trace it at when none is given."""
import copy
import os.path as osp
from typing import Optional, Tuple

import torch.nn as nn
from mmengine.config import Config

from .errors import ExportError


def load_model(config: str, checkpoint: str, cfg_options: Optional[dict] = None
               ) -> Tuple[nn.Module, Config, str]:
    """Build the config's model, load ``checkpoint`` strictly, ``eval()`` it.

    Returns ``(model, cfg, library)`` with ``library`` one of ``'mmdet'``,
    ``'mmseg'``, ``'mmpretrain'`` (from the config's ``default_scope``).
    """
    from mmengine.registry import DefaultScope
    from mmengine.runner import load_checkpoint

    from ..engine.runtime import detect_library, library_models, load_config

    # a copy: mmengine's merge pops `_delete_` out of the dicts it is given
    cfg = load_config(config, copy.deepcopy(cfg_options))
    library = detect_library(cfg)
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint!r}')
    with DefaultScope.overwrite_default_scope(library):
        model = library_models(library).build(cfg.model)
    try:
        ckpt = load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                               logger='silent')
    except RuntimeError as exc:
        raise ExportError(
            f'checkpoint {checkpoint!r} does not match the model of {config!r}: {exc}\n'
            'Export needs a checkpoint of this whole model as tools/train.py saves it '
            '(work_dirs/.../iter_N.pth or epoch_N.pth); a backbone-only file (the '
            "authors' release, or conv2former_to_mm.py --for det) has no neck/head weights."
        ) from None
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    if 'dataset_meta' in meta:
        model.dataset_meta = meta['dataset_meta']
    model.cfg = cfg
    model.eval()
    return model, cfg, library


def default_shape(cfg: Config, library: str) -> Tuple[int, int]:
    """The example input size when none is given: the config's ``crop_size``
    (mmseg), else 224x224 (classifiers) or 800x1344 (detectors)."""
    crop = cfg.get('crop_size')
    if library == 'mmseg' and isinstance(crop, (tuple, list)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    return (224, 224) if library == 'mmpretrain' else (800, 1344) if library == 'mmdet' \
        else (512, 512)
