"""What ``tools/train.py`` and ``tools/test.py`` share: picking the library a
config belongs to, and adapting GPU-only settings to the machine at hand."""
import logging
import os.path as osp
from typing import Any, List, Optional, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

# default_scope -> the package that must be importable to run the config.
LIBRARIES = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}


def detect_library(cfg: Config) -> str:
    """Return ``'mmdet'``, ``'mmseg'`` or ``'mmpretrain'`` for a config.

    The config's ``default_scope`` decides; every config in ``configs/``
    inherits one from its library's ``default_runtime``.
    """
    scope = cfg.get('default_scope')
    if scope not in LIBRARIES:
        raise ValueError(
            f'cannot tell which library runs this config: default_scope={scope!r}. '
            f"Set default_scope to one of {sorted(LIBRARIES)} (inherit the library's "
            "_base_/default_runtime.py), e.g. default_scope = 'mmdet'.")
    try:
        __import__(LIBRARIES[scope])
    except ImportError as exc:
        raise ImportError(f'this config needs {LIBRARIES[scope]}, which failed to import '
                          f'({exc}); run `bash tools/setup_env.sh`') from exc
    return scope


def _replace_types(node: Any, old: str, new: str, path: str, changed: List[str]) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'type' and value == old:
                node[key] = new
                changed.append(path or '<root>')
            else:
                _replace_types(value, old, new, f'{path}.{key}' if path else str(key), changed)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _replace_types(item, old, new, f'{path}[{i}]', changed)
    return node


def adapt_to_device(cfg: Config, distributed: bool = False) -> Tuple[Config, List[str]]:
    """Make a GPU recipe runnable on a CPU-only machine, saying what changed.

    Without CUDA: ``SyncBN`` becomes ``BN`` (multi-process CPU runs cannot
    synchronise BatchNorm; single-process runs would compute plain BN anyway)
    and ``AmpOptimWrapper`` becomes ``OptimWrapper`` (mmengine's AMP wrapper
    requires a GPU; fp32 is the only safe CPU default). With CUDA nothing
    changes. Returns the config (modified in place) and the list of notes.
    """
    notes: List[str] = []
    if torch.cuda.is_available():
        return cfg, notes
    changed: List[str] = []
    _replace_types(cfg._cfg_dict, 'SyncBN', 'BN', '', changed)
    _replace_types(cfg._cfg_dict, 'MMSyncBN', 'BN', '', changed)
    if changed:
        notes.append(f'no CUDA: SyncBN -> BN at {", ".join(sorted(set(changed)))}')
    wrapper = cfg.get('optim_wrapper')
    if isinstance(wrapper, (dict, ConfigDict)) and wrapper.get('type') == 'AmpOptimWrapper':
        wrapper['type'] = 'OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            wrapper.pop(key, None)
        notes.append('no CUDA: AmpOptimWrapper -> OptimWrapper (fp32)')
    return cfg, notes



def load_config(path: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                work_dir: Optional[str] = None) -> Config:
    """Read a config as mmdet's tools do, with clear errors, ready to run here.

    Work dir priority: ``work_dir`` argument > the config's > ``work_dirs/<name>``.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'config not found: {path!r}. Configs live under configs/ '
            '(e.g. configs/mask_rcnn/mask-rcnn_conv2former-t_fpn_1x_coco.py); '
            'check the path relative to the current directory.')
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    detect_library(cfg)
    _, notes = adapt_to_device(cfg, distributed=launcher != 'none')
    for note in notes:
        print_log(note, logger='current', level=logging.WARNING)
    return cfg


def build_runner(cfg: Config):
    """``Runner.from_cfg`` (or the config's ``runner_type``), able to resume.

    mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch >= 2.6
    then refuses the non-tensor objects in mmengine's own checkpoints. We
    allow-list exactly those (not "unpickle anything") before building.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from ..checkpoint import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
