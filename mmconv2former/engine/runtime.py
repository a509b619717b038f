"""What ``tools/train.py`` and ``tools/test.py`` share: reading a config with
clear errors, picking the library it belongs to, adapting GPU-only settings to
the machine at hand, keeping earlier runs intact, and building the runner."""
import glob
import json
import logging
import os
import os.path as osp
import re
import tempfile
import uuid
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

# default_scope -> the package that must be importable to run the config.
LIBRARIES = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain', 'mmpose': 'mmpose',
             'mmaction': 'mmaction'}


def detect_library(cfg: Config) -> str:
    """Return ``'mmdet'``, ``'mmseg'``, ``'mmpretrain'``, ``'mmpose'`` or
    ``'mmaction'`` for a config.

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


def library_models(library: str):
    """The ``MODELS`` registry of ``library`` (``'mmdet'``, ...), with the
    library's modules registered (importing ``<library>.models`` does that)."""
    __import__(f'{library}.models')
    return __import__(f'{library}.registry', fromlist=['MODELS']).MODELS


def innermost_dataset(dataset_cfg):
    """The dataset inside wrappers (``RepeatDataset``, ``ClassBalancedDataset``...)."""
    while isinstance(dataset_cfg, dict) and 'dataset' in dataset_cfg:
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg


# ----------------------------------------------------------------------------- device
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

    Without CUDA: ``SyncBN`` becomes ``BN`` (gloo cannot synchronise
    BatchNorm; a single process would compute plain BN anyway),
    ``AmpOptimWrapper`` becomes ``OptimWrapper`` (mmengine's AMP wrapper needs
    a GPU; fp32 is the safe CPU default), and a distributed run uses the gloo
    backend with a device-less DDP wrapper. With CUDA nothing changes.
    Returns the config (modified in place) and the notes.
    """
    notes: List[str] = []
    if torch.cuda.is_available():
        return cfg, notes
    changed: List[str] = []
    for sync_type in ('SyncBN', 'MMSyncBN'):
        _replace_types(cfg._cfg_dict, sync_type, 'BN', '', changed)
    if changed:
        notes.append(f'no CUDA: SyncBN -> BN at {", ".join(sorted(set(changed)))}')
    wrapper = cfg.get('optim_wrapper')
    if isinstance(wrapper, (dict, ConfigDict)) and wrapper.get('type') == 'AmpOptimWrapper':
        wrapper['type'] = 'OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            wrapper.pop(key, None)
        notes.append('no CUDA: AmpOptimWrapper -> OptimWrapper (fp32)')
    if distributed:
        cfg.setdefault('env_cfg', ConfigDict())
        cfg.env_cfg.setdefault('dist_cfg', ConfigDict())
        if cfg.env_cfg.dist_cfg.get('backend') != 'gloo':
            cfg.env_cfg.dist_cfg['backend'] = 'gloo'
            notes.append('no CUDA: distributed backend -> gloo')
        wrapper_cfg = cfg.get('model_wrapper_cfg') or ConfigDict(type='MMDistributedDataParallel')
        wrapper_cfg['device_ids'] = None  # CPU modules take no device ids
        cfg.model_wrapper_cfg = wrapper_cfg
    return cfg, notes


# ----------------------------------------------------------------------------- work dirs
def _has_run(work_dir: str) -> bool:
    return osp.isfile(osp.join(work_dir, 'last_checkpoint')) or bool(glob.glob(osp.join(work_dir, '*.pth')))


def _runs(work_dir: str) -> List[str]:
    """``work_dir`` and the ``work_dir-runN`` siblings made by later runs."""
    siblings = [d for d in glob.glob(glob.escape(work_dir) + '-run*')
                if re.fullmatch(r'-run\d+', d[len(work_dir):])]
    return [work_dir] + sorted(siblings, key=lambda d: int(d.rsplit('-run', 1)[1]))


def choose_work_dir(work_dir: str, resume: Optional[str]) -> Tuple[str, Optional[str]]:
    """Never write a new run over an earlier one.

    A fresh run into a work dir that holds checkpoints goes to the next free
    ``<work_dir>-runN`` instead; ``--resume`` without a path continues the
    newest of those runs. Returns the work dir and a note (or None).
    """
    runs = [d for d in _runs(work_dir) if _has_run(d)]
    if resume == 'auto':
        if not runs:
            return work_dir, None
        newest = max(runs, key=lambda d: os.path.getmtime(osp.join(d, 'last_checkpoint'))
                     if osp.isfile(osp.join(d, 'last_checkpoint')) else 0)
        return newest, (f'resuming the newest run in {newest}' if newest != work_dir else None)
    if resume is not None or not _has_run(work_dir):
        return work_dir, None
    n = 2
    while osp.exists(f'{work_dir}-run{n}'):
        n += 1
    new = f'{work_dir}-run{n}'
    return new, (f'{work_dir} holds checkpoints of an earlier run, which are kept; this run writes '
                 f'to {new} (use --resume to continue the earlier run instead)')


def check_writable(work_dir: str) -> None:
    try:
        os.makedirs(work_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=work_dir):
            pass
    except OSError as exc:
        raise PermissionError(
            f'cannot write to the work dir {work_dir!r} ({exc.strerror or exc}); '
            'choose a writable one with --work-dir') from None


# ----------------------------------------------------------------------------- data files
def _datasets(dataset_cfg: Any) -> Iterator[dict]:
    """The leaf dataset configs inside wrappers (Repeat/Concat/ClassBalanced...)."""
    if isinstance(dataset_cfg, dict):
        if 'dataset' in dataset_cfg:
            yield from _datasets(dataset_cfg['dataset'])
        elif 'datasets' in dataset_cfg:
            for item in dataset_cfg['datasets']:
                yield from _datasets(item)
        else:
            yield dataset_cfg


def check_data_files(cfg: Config, loaders: Sequence[str]) -> None:
    """Fail early, naming the file and the fix, when annotations or image
    folders a loader needs are missing, or a JSON annotation file is broken."""
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        for ds in _datasets(loader_cfg.get('dataset')):
            root = ds.get('data_root') or ''
            ann = ds.get('ann_file') or ''
            if ann and not ann.startswith(('http://', 'https://', 's3://')):
                path = ann if osp.isabs(ann) else osp.join(root, ann)
                if not osp.isfile(path):
                    raise FileNotFoundError(
                        f'annotation file not found: {path!r} ({loader}.dataset.ann_file). Lay the data '
                        'out as the README describes (e.g. data/coco/annotations/instances_train2017.json) '
                        'or point data_root/ann_file at it with --cfg-options; the demos write theirs '
                        'with tools/demo/*.py.')
                if path.endswith('.json'):
                    _check_json(path, loader)
            prefix = ds.get('data_prefix') or {}
            folders = prefix.values() if isinstance(prefix, dict) else [prefix]
            for folder in folders:
                if isinstance(folder, str) and folder:
                    path = folder if osp.isabs(folder) else osp.join(root, folder)
                    if not osp.isdir(path):
                        raise FileNotFoundError(
                            f'image/label folder not found: {path!r} ({loader}.dataset.data_prefix). '
                            'Check data_root and data_prefix (see the README for the expected layout).')


def _check_json(path: str, loader: str) -> None:
    size = osp.getsize(path)
    with open(path, 'rb') as f:
        try:
            if size <= 64 * 2 ** 20:  # parse small files fully; big ones: the dataset will
                json.load(f)
            elif f.read(4096).lstrip()[:1] not in (b'{', b'['):
                raise json.JSONDecodeError('does not start with { or [', '', 0)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f'annotation file {path!r} ({loader}) is not valid JSON: {exc}. It is probably '
                'truncated or not an annotation file; download or generate it again.') from None


# ----------------------------------------------------------------------------- entry points
def load_config(path: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                work_dir: Optional[str] = None, resume: Optional[str] = None,
                mode: Optional[str] = None) -> Config:
    """Read a config as mmdet's tools do, with clear errors, ready to run here.

    Args:
        path: config file.
        cfg_options: ``--cfg-options`` overrides.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
        work_dir: overrides the config's; default ``work_dirs/<config name>``.
        resume: ``'auto'`` (latest checkpoint), a checkpoint path, or None.
        mode: ``'train'`` (checks train/val data and the work dir, protects
            earlier runs, adds :class:`NonFiniteCheckHook`, and mmengine's
            ``SyncBuffersHook`` for distributed runs), ``'test'`` (checks test
            data and the work dir) or None (only read and adapt, e.g. to build
            the model).
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
        if 'custom_imports' in cfg:  # Config.fromfile imported only the file's own list
            from mmengine.utils import import_modules_from_strings
            import_modules_from_strings(**cfg.custom_imports)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    detect_library(cfg)
    notes: List[str] = []
    if mode == 'train':
        cfg.work_dir, note = choose_work_dir(cfg.work_dir, resume)
        notes += [note] if note else []
        if resume == 'auto':
            cfg.resume, cfg.load_from = True, None
        elif resume is not None:
            if not osp.isfile(resume):
                raise FileNotFoundError(f'checkpoint to resume from not found: {resume!r}')
            cfg.resume, cfg.load_from = True, resume
        hooks = list(cfg.get('custom_hooks') or [])
        wanted = ['NonFiniteCheckHook']
        if launcher != 'none':
            # BatchNorm running statistics are per process under DDP; averaging
            # them every epoch keeps replicas (and the saved checkpoint) identical.
            wanted.append('SyncBuffersHook')
        for name in wanted:
            if not any(h.get('type') == name for h in hooks):
                hooks.append(dict(type=name))
        cfg.custom_hooks = hooks
        check_data_files(cfg, ['train_dataloader', 'val_dataloader'])
    elif mode == 'test':
        check_data_files(cfg, ['test_dataloader'])
    if mode is not None:
        check_writable(cfg.work_dir)
    notes += adapt_to_device(cfg, distributed=launcher != 'none')[1]
    for note in notes:
        print_log(note, logger='current', level=logging.WARNING)
    return cfg


def build_runner(cfg: Config):
    """``Runner.from_cfg`` (or the config's ``runner_type``).

    Checkpoints load through torch's ``weights_only`` allow-list, which
    ``import mmconv2former`` extends by exactly the classes mmengine's own
    checkpoints need. A CPU-only ``torchrun`` launch gets its gloo process
    group here: mmengine's launcher would first call ``torch.cuda.set_device``.
    The config's visualizer gets a name of its own (``<name>_<random hex>``).
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    visualizer = cfg.get('visualizer')
    if isinstance(visualizer, dict):
        # Visualizer.get_instance hands back the first instance built under a
        # name (every OpenMMLab runtime names it 'visualizer'), so a second
        # runner in one process (train then test) would draw with the first
        # one's save_dir and settings.
        visualizer['name'] = f"{visualizer.get('name', 'visualizer')}_{uuid.uuid4().hex[:8]}"

    import torch.distributed as dist
    if cfg.get('launcher', 'none') == 'pytorch' and not torch.cuda.is_available() \
            and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


# ----------------------------------------------------------------------------- synthetic data
def config_argument(cfg: dict, name: str, registry) -> Any:
    """``cfg[name]``, or the default of that argument of the class that
    ``registry`` builds from ``cfg`` (None when it has no such argument)."""
    import inspect
    if name in cfg:
        return cfg[name]
    cls = registry.get(cfg['type']) if isinstance(cfg.get('type'), str) else cfg.get('type')
    parameter = inspect.signature(cls).parameters.get(name) if cls is not None else None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def synthetic_batch(model_cfg: dict, library: str, size: int, batch: int = 2) -> dict:
    """A deterministic batch of ``batch`` random ``size`` x ``size`` uint8
    images with ground truth that ``model_cfg`` can train on, in the form
    ``model.train_step``/``test_step`` of ``library`` take (``inputs`` and
    ``data_samples``).

    mmdet: two boxes per image (masks and a semantic map only when the model
    learns them); mmseg: a random map of the decode head's classes;
    mmpretrain: label 0; mmpose: one person crop at the codec's
    ``input_size`` (which the heads are tied to, so ``size`` is not used)
    with random keypoints, encoded by mmpose's own ``GenerateTarget`` and
    ``PackPoseInputs``; mmaction: clips of ``T`` frames (the head's or
    backbone's ``num_segments``, set or by default, else 2), label 0.
    """
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(batch)]
    meta = dict(ori_shape=(size, size), img_shape=(size, size), pad_shape=(size, size), scale_factor=(1.0, 1.0))
    if library == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        panoptic = (model_cfg.get('panoptic_fusion_head') or {}).get('num_stuff_classes', 0) > 0 \
            or 'semantic_head' in model_cfg
        # masks only for models that learn them (RTMDet's assigner reads any it is given)
        masks = any(word in repr(model_cfg) for word in ('loss_mask', 'mask_head'))
        # num_classes=2: mmdet draws labels from [1, num_classes)
        return demo_mm_inputs(batch, [(3, size, size)] * batch, num_items=[2] * batch, num_classes=2,
                              with_mask=masks, with_semantic=panoptic)
    if library == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        head = model_cfg.get('decode_head')
        head = head[0] if isinstance(head, (list, tuple)) else head
        classes = int(head.get('num_classes', 2))
        samples = []
        for _ in range(batch):
            sample = SegDataSample(metainfo=meta)
            labels = torch.randint(0, classes, (1, size, size), generator=g)
            sample.gt_sem_seg = PixelData(data=labels)
            samples.append(sample)
        return dict(inputs=images, data_samples=samples)
    if library == 'mmpose':
        return _pose_batch(model_cfg, batch)
    if library == 'mmaction':
        from mmaction.structures import ActionDataSample
        models = library_models(library)
        segments = config_argument(model_cfg.get('cls_head') or {}, 'num_segments', models) \
            or config_argument(model_cfg['backbone'], 'num_segments', models) or 2
        clips = [torch.randint(0, 256, (segments, 3, size, size), dtype=torch.uint8, generator=g)
                 for _ in range(batch)]
        return dict(inputs=clips, data_samples=[ActionDataSample(metainfo=meta).set_gt_label(0)
                                                for _ in range(batch)])
    from mmpretrain.structures import DataSample
    return dict(inputs=images, data_samples=[DataSample(metainfo=meta).set_gt_label(0) for _ in range(batch)])


def _pose_batch(model_cfg: dict, batch: int) -> dict:
    """Top-down samples as mmpose's training pipeline leaves them after
    ``TopdownAffine``, then its own target generation and packing, so every
    codec (heatmaps, SimCC, regression) gets the targets its head expects."""
    import numpy as np
    from mmpose.datasets.transforms import GenerateTarget, PackPoseInputs
    head = model_cfg['head']
    codec = head.get('decoder')
    if codec is None:
        raise ValueError(f'{head.get("type")} has no decoder (codec): cannot make its training targets')
    keypoints = next((head[k] for k in ('out_channels', 'num_joints', 'num_keypoints') if head.get(k)), None)
    if keypoints is None:
        raise ValueError(f'{head.get("type")} names no number of keypoints (out_channels / num_joints / '
                         'num_keypoints)')
    w, h = codec['input_size']
    rng = np.random.default_rng(0)
    encode, pack = GenerateTarget(encoder=codec), PackPoseInputs()
    inputs, samples = [], []
    for i in range(batch):
        results = dict(
            id=i, img_id=i, category_id=1, img=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            img_shape=(h, w), ori_shape=(h, w), input_size=(w, h),
            input_center=np.array([w / 2, h / 2], dtype=np.float32),
            input_scale=np.array([w, h], dtype=np.float32),
            bbox=np.array([[0, 0, w, h]], dtype=np.float32), bbox_score=np.ones(1, dtype=np.float32),
            bbox_center=np.array([[w / 2, h / 2]], dtype=np.float32),
            bbox_scale=np.array([[w, h]], dtype=np.float32),
            keypoints=(rng.uniform(0.2, 0.8, (1, keypoints, 2)) * [w, h]).astype(np.float32),
            keypoints_visible=np.ones((1, keypoints), dtype=np.float32),
            flip_indices=list(range(keypoints)))  # any permutation serves a smoke test
        packed = pack(encode(results))
        inputs.append(packed['inputs'])
        samples.append(packed['data_samples'])
    return dict(inputs=inputs, data_samples=samples)
