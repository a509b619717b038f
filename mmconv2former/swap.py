"""Put Conv2Former into any mmdet, mmseg, mmpretrain, mmpose or mmaction2 config.

:func:`swap_backbone` reads a config, builds its backbone and runs a tiny
forward to learn each output's channels and stride (so any registered backbone
works, not a table of known ones), maps every output to the Conv2Former stage
of the same stride, rewrites the channel arguments of exactly the modules that
read the backbone (the neck when there is one, otherwise the heads), and
writes a short delta config over the source (``_base_ = SRC``). A neck
without channel arguments (mmpretrain's pooling, mmpose's
``FeatureMapProcessor``) is run on maps of both widths to learn what the heads
behind it read. Where it cannot see how the backbone's outputs are consumed
it raises :class:`SwapError` naming what to set by hand, and writes nothing.
:func:`check_config` builds the result and runs one training step and one
prediction on a tiny synthetic batch. ``tools/misc/swap_backbone.py`` is the
command line.
"""
import copy
import math
import os
import os.path as osp
import tempfile
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from .models import Conv2Former

# The release was trained with timm's ImageNet defaults, on RGB images.
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
# Our detection configs' rates (mask_rcnn/*_1x_coco.py); n from classification.
DROP_PATH_RATES = {'n': 0.1, 't': 0.2, 's': 0.3, 'b': 0.4, 'b_22k': 0.4, 'l': 0.4}

# model.* entries that never read the backbone's features.
NON_READERS = {'type', '_scope_', 'backbone', 'neck', 'data_preprocessor', 'train_cfg', 'test_cfg',
               'init_cfg', 'pretrained', 'panoptic_fusion_head'}
# model.* entries that read the backbone's features when there is no neck.
HEADS = ('decode_head', 'auxiliary_head', 'head', 'bbox_head', 'rpn_head', 'panoptic_head',
         'mask_head', 'semantic_head', 'cls_head')
# Libraries whose heads resize or pool whatever stride they get: there a
# dilated source backbone (repeated strides) maps to deeper stages in order.
STRIDE_FREE = {'mmseg': 'the segmentation heads resize to the image, as in mmseg\'s -d32 configs',
               'mmpretrain': 'the classifier pools globally', 'mmaction': 'the recognizer pools globally'}
# Layer-decay constructors that dispatch on the backbone's class name.
NAME_BOUND_DECAY = {'LearningRateDecayOptimizerConstructor', 'LearningRateDecayOptimWrapperConstructor'}


class SwapError(ValueError):
    """The config cannot be swapped automatically; ``problems`` says why."""

    def __init__(self, src: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = '\n'.join(f'  - {p}' for p in self.problems)
        super().__init__(f'cannot swap the backbone of {src} automatically; nothing was written.\n{lines}')


@dataclass
class SwapResult:
    """What :func:`swap_backbone` wrote and why."""
    dst: str
    text: str
    library: str
    old_type: str
    old_channels: List[int]
    old_strides: List[int]
    out_indices: Tuple[int, ...]
    new_channels: List[int]
    changes: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def resolve_config(src: str) -> str:
    """The file behind ``src``: a path, or ``mmdet::...`` as mim resolves it."""
    if '::' in src:
        try:
            path, _ = Config._get_cfg_path(src, '')
        except (ValueError, FileNotFoundError, ModuleNotFoundError, AssertionError) as exc:
            raise FileNotFoundError(f'config not found: {src!r} ({exc})') from None
        if not osp.isfile(path):
            raise FileNotFoundError(f'config not found: {src!r} (looked for {path})')
        return path
    if not osp.isfile(src):
        raise FileNotFoundError(f'config not found: {src!r}')
    return osp.abspath(src)


def _library(cfg: Config) -> str:
    from .engine.runtime import detect_library
    return detect_library(cfg)


def _registry(library: str):
    from .engine.runtime import library_models
    return library_models(library)


def probe_backbone(backbone_cfg: dict, library: str, src: str = 'the config',
                   sizes: Sequence[int] = (128, 224, 512), batch: int = 1) -> Tuple[List[int], List[int]]:
    """Build a backbone and run ``batch`` images through it: ``(channels,
    strides)`` of its outputs, in the order it returns them. (A backbone that
    shifts features between a clip's frames, mmaction2's ``ResNetTSM``, needs
    a batch of whole clips.)"""
    from mmengine.model import revert_sync_batchnorm
    registry = _registry(library)
    cfg = copy.deepcopy(backbone_cfg)
    cfg.pop('init_cfg', None)  # no downloads: only the shapes matter
    cfg.pop('pretrained', None)
    with DefaultScope.overwrite_default_scope(library):
        model = revert_sync_batchnorm(registry.build(cfg))
    model.eval()  # not chained: mmdet's ResNet.train returns None
    error: Optional[Exception] = None
    for size in sizes:  # some backbones want a minimum (or fixed) input size
        try:
            with torch.no_grad():
                outs = model(torch.rand(batch, 3, size, size))
        except Exception as exc:  # noqa: BLE001  (any failure: try the next size)
            error = exc
            continue
        if torch.is_tensor(outs):
            outs = (outs, )
        if not isinstance(outs, (list, tuple)) or not all(torch.is_tensor(o) and o.ndim == 4 for o in outs):
            items = outs if isinstance(outs, (list, tuple)) else [outs]
            shapes = [tuple(o.shape) if torch.is_tensor(o) else type(o).__name__ for o in items]
            raise SwapError(src, [
                f'the backbone {cfg.get("type")} returns {type(outs).__name__} of {shapes}, not a '
                'sequence of (B, C, H, W) maps; set its consumers\' channels by hand'])
        channels = [int(o.shape[1]) for o in outs]
        strides = [size / o.shape[-1] for o in outs]
        return channels, [int(round(s)) if abs(s - round(s)) < 0.2 else s for s in strides]
    raise SwapError(src, [f'could not run the source backbone {cfg.get("type")} on a random image '
                          f'({type(error).__name__}: {error})'])


def _reads_channels(cfg: Any) -> bool:
    """Whether a config (or any dict nested in it) has a ``*in_channels`` argument."""
    if isinstance(cfg, dict):
        return any(k.endswith('in_channels') or _reads_channels(v) for k, v in cfg.items())
    if isinstance(cfg, (list, tuple)):
        return any(_reads_channels(v) for v in cfg)
    return False


def probe_neck(neck_cfg: dict, library: str, channels: Sequence[int], strides: Sequence[Union[int, float]],
               size: int = 256) -> Tuple[List[int], List[Optional[Union[int, float]]]]:
    """Run zero maps of ``channels`` at ``strides`` through a neck without
    channel arguments: ``(channels, strides)`` of what it hands the heads
    (stride None for pooled, non-spatial outputs)."""
    with DefaultScope.overwrite_default_scope(library):
        neck = _registry(library).build(copy.deepcopy(neck_cfg))
    neck.eval()
    maps = tuple(torch.zeros(1, c, max(round(size / s), 1), max(round(size / s), 1))
                 for c, s in zip(channels, strides))
    with torch.no_grad():
        outs = neck(maps)
    outs = (outs, ) if torch.is_tensor(outs) else tuple(outs)
    out_strides = [size / o.shape[-1] if o.ndim == 4 else None for o in outs]
    return ([int(o.shape[1]) for o in outs],
            [int(round(s)) if s is not None and abs(s - round(s)) < 0.2 else s for s in out_strides])


def map_stages(strides: Sequence[Union[int, float]], library: str) -> Tuple[Tuple[int, ...], List[str], List[str]]:
    """Conv2Former stage for each source output: ``(out_indices, notes, problems)``.

    Each output goes to the stage of the same stride (4, 8, 16, 32: stages 0-3).
    A repeated stride (a dilated backbone such as mmseg's ResNetV1c with
    strides (1, 2, 1, 1)) goes to the next deeper stage instead, keeping the
    number and order of outputs: the heads then see strides 4-32, as in
    mmseg's ``-d32`` configs. Segmentation heads resize to the image and do
    not mind; a detector's anchors and RoI extractors are tied to the
    strides, so there a repeated stride is refused.
    """
    problems: List[str] = []
    stages: List[int] = []
    for i, stride in enumerate(strides):
        stage = int(math.log2(stride)) - 2 if isinstance(stride, int) and stride > 0 else -1
        if not (isinstance(stride, int) and 2 ** (stage + 2) == stride and 0 <= stage <= 3):
            problems.append(
                f'backbone output {i} has stride {stride}; Conv2Former has outputs at strides 4, 8, 16 '
                'and 32 only. Drop that output from the backbone (out_indices) and from its consumer '
                '(in_channels / in_index), or add a neck that makes it, then swap again')
            stages.append(max(stage, 0))
            continue
        stages.append(max(stage, stages[-1] + 1) if stages else stage)
    if problems:
        return tuple(stages), [], problems
    notes: List[str] = []
    if any(s > 3 for s in stages):
        return tuple(stages), [], [
            f'the backbone has {len(strides)} outputs at strides {list(strides)}; Conv2Former has one '
            'output per stride (4, 8, 16, 32). Set the outputs (out_indices) and the consumers\' '
            'in_channels / in_index by hand (e.g. a ViT with a MultiLevelNeck: drop the neck and '
            'read stages 0-3)']
    new_strides = [4 * 2 ** s for s in stages]
    if new_strides != list(strides):
        if library not in STRIDE_FREE:
            tied = ("the detector's anchors / RoI extractors" if library == 'mmdet' else
                    "the heatmap / SimCC sizes of the pose codec" if library == 'mmpose' else "the heads")
            return tuple(stages), [], [
                f'the backbone is dilated (outputs at strides {list(strides)}); Conv2Former has no '
                f'dilation, so they would become strides {new_strides}, and {tied} are tied to the old '
                'ones. Start from the undilated variant of the config']
        notes.append(f'dilated source backbone: outputs at strides {list(strides)} become Conv2Former '
                     f'stages {list(stages)} at strides {new_strides} (Conv2Former has no dilation; '
                     f'{STRIDE_FREE[library]})')
    return tuple(stages), notes, problems


# ----------------------------------------------------------------------------- consumers
def _type_name(cfg: Any) -> str:
    name = cfg.get('type', '?') if isinstance(cfg, dict) else '?'
    return name.split('.')[-1] if isinstance(name, str) else getattr(name, '__name__', str(name))


def find_consumers(model: dict) -> Tuple[List[str], List[str]]:
    """Paths (``'neck'``, ``'decode_head'``, ``'neck[0]'`` ...) of the model
    entries that read the backbone's outputs, and problems."""
    neck = model.get('neck')
    if isinstance(neck, (list, tuple)) and neck:
        return ['neck[0]'], []  # a chain of necks: only the first reads the backbone
    if isinstance(neck, dict) and _reads_channels(neck):
        return ['neck'], []
    # no neck, or one without channel arguments (pooling, mmpose's
    # FeatureMapProcessor): the heads' widths follow the backbone's
    consumers, problems = [], []
    for key, value in model.items():
        if key in NON_READERS or not isinstance(value, (dict, list, tuple)) or not value:
            continue
        if key == 'roi_head':
            problems.append(
                'model.roi_head reads the backbone directly (there is no neck): its RoI extractor\'s '
                'out_channels and shared head are tied to the backbone\'s width. Set them by hand, or '
                'start from a config with a neck (e.g. the FPN variant)')
        elif key in HEADS:
            if isinstance(value, (list, tuple)):
                consumers += [f'{key}[{i}]' for i in range(len(value))]
            else:
                consumers.append(key)
        elif isinstance(value, dict) and 'type' in value:
            problems.append(f'model.{key} ({_type_name(value)}) may read the backbone\'s outputs and the '
                            'tool does not know how; set its channels by hand')
    if not consumers and not problems:
        problems.append('found no neck or head that reads the backbone (model has '
                        f'{sorted(k for k in model if k not in NON_READERS)})')
    return consumers, problems


def _get(model: dict, path: str) -> Any:
    key, _, rest = path.partition('[')
    value = model[key]
    return value[int(rest[:-1])] if rest else value


def _indices(in_index: Any, n: int) -> Optional[Union[int, List[int]]]:
    if in_index is None:
        return None
    if isinstance(in_index, int):
        return in_index + n if in_index < 0 else in_index
    return [i + n if i < 0 else i for i in in_index]


def _map_channels(value: Any, old: List[int], new: List[int], index: Any) -> Optional[Any]:
    """The new value of a channel argument, or None when it cannot be mapped."""
    n = len(old)
    if isinstance(value, (list, tuple)):
        if isinstance(index, list) and len(index) == len(value) and all(0 <= i < n for i in index):
            if [old[i] for i in index] == list(value):
                return type(value)(new[i] for i in index)
            return None
        if list(value) == old:
            return type(value)(new)
        return None
    if isinstance(value, int):
        if isinstance(index, int):
            return new[index] if 0 <= index < n and old[index] == value else None
        matches = {new[i] for i, c in enumerate(old) if c == value}
        return matches.pop() if len(matches) == 1 else None
    return None


def rewrite_consumer(cfg: dict, path: str, old: List[int], new: List[int], default_in_index: Any,
                     top: bool = True) -> Tuple[dict, List[str], List[str]]:
    """``(delta, changes, problems)`` for one consumer: every ``*in_channels``
    argument (nested ones too, e.g. a pixel decoder's) mapped from the source
    backbone's output channels to Conv2Former's."""
    delta: Dict[str, Any] = {}
    changes: List[str] = []
    problems: List[str] = []
    index = _indices(cfg.get('in_index', default_in_index), len(old)) if top else None
    for key, value in cfg.items():
        where = f'model.{path}.{key}'
        if key.endswith('in_channels') and value is not None:
            mapped = _map_channels(value, old, new, index if key == 'in_channels' else None)
            if mapped is None:
                problems.append(
                    f'{where}={value!r} does not match the backbone outputs it reads (channels {old}'
                    f'{f", in_index {index}" if index is not None and key == "in_channels" else ""}); '
                    f'set it by hand from Conv2Former\'s output channels {new}')
            else:
                delta[key] = mapped
                changes.append(f'{where}: {value!r} -> {mapped!r}')
        elif isinstance(value, dict):
            sub, sub_changes, sub_problems = rewrite_consumer(value, f'{path}.{key}', old, new, None, top=False)
            if sub:
                delta[key] = sub
            changes += sub_changes
            problems += sub_problems
    if top and not changes and not problems:
        problems.append(f'model.{path} ({_type_name(cfg)}) reads the backbone but has no in_channels '
                        f'argument the tool recognises; give it Conv2Former\'s channels {new} by hand')
    return delta, changes, problems


# ----------------------------------------------------------------------------- writing
def _fmt(value: Any, indent: int = 0) -> str:
    """Python source for a config value, dicts as ``dict(...)``."""
    pad = ' ' * (indent + 4)
    if isinstance(value, dict):
        if not value:
            return 'dict()'
        if all(isinstance(k, str) and k.isidentifier() for k in value):
            items = [f'{k}={_fmt(v, indent + 4)}' for k, v in value.items()]
            open_, close = 'dict(', ')'
        else:  # keys such as custom_keys' parameter names
            items = [f'{k!r}: {_fmt(v, indent + 4)}' for k, v in value.items()]
            open_, close = '{', '}'
        one_line = f'{open_}{", ".join(items)}{close}'
        if len(one_line) + indent <= 96 and '\n' not in one_line:
            return one_line
        return open_ + '\n' + ',\n'.join(pad + i for i in items) + close
    if isinstance(value, (list, tuple)):
        items = [_fmt(v, indent + 4) for v in value]
        open_, close = ('[', ']') if isinstance(value, list) else ('(', ',)' if len(value) == 1 else ')')
        one_line = open_ + ', '.join(items) + close
        if len(one_line) + indent <= 96 and '\n' not in one_line:
            return one_line
        return open_ + '\n' + ',\n'.join(pad + i for i in items) + close
    return repr(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _preprocessor_delta(pre: dict, library: str) -> dict:
    delta = dict(mean=list(MEAN), std=list(STD))
    if library == 'mmaction':  # its decoders (decord, PyAV, RawFrameDecode) give RGB frames
        return delta
    if 'to_rgb' in pre or (library == 'mmpretrain' and 'bgr_to_rgb' not in pre):
        delta['to_rgb'] = True
    else:
        delta['bgr_to_rgb'] = True
    if pre.get('rgb_to_bgr'):
        delta['rgb_to_bgr'] = False
    return delta


def _pretrained_init(path: str, arch: dict) -> Tuple[dict, str]:
    """``init_cfg`` for a checkpoint, with the prefix its keys carry; the
    checkpoint must hold this arch's weights."""
    from .checkpoint import arch_name, extract_state_dict, infer_arch, safe_load
    if not osp.isfile(path):
        raise FileNotFoundError(f'pretrained checkpoint not found: {path!r}. Convert the authors\' '
                                'file with tools/model_converters/conv2former_to_mm.py first')
    raw = safe_load(path)
    state = raw.get('state_dict', raw.get('model', raw)) if isinstance(raw, dict) else {}
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in state]
    prefix = 'backbone.' if any(k.startswith('backbone.') for k in keys) else None
    found = infer_arch(extract_state_dict(raw, prefix=prefix))
    if (found['channels'], found['depths'], found['kernel_size']) != \
            (arch['channels'], arch['depths'], arch['kernel_size']):
        name = arch_name(found, Conv2Former.arch_settings)
        raise ValueError(f'{path} holds a Conv2Former with channels {found["channels"]}, depths '
                         f'{found["depths"]}, kernel {found["kernel_size"]}'
                         f'{f" (arch {name!r})" if name else ""}; pass the matching --arch')
    init = dict(type='Pretrained', checkpoint=path, prefix=prefix)
    why = ("keys under 'backbone.' (an mm checkpoint)" if prefix else "the release's unprefixed keys")
    return init, why


def _featuremap_size(head: dict, where: str, stride: Union[int, float, None],
                     delta: dict) -> Tuple[List[str], List[str]]:
    """RTMPose's ``RTMCCHead`` flattens a map of ``in_featuremap_size``, which
    is its ``input_size`` over the stride of the map it reads: keep it when it
    still matches, else rewrite it (into ``delta``). ``(changes, notes)``."""
    size, input_size = head.get('in_featuremap_size'), head.get('input_size')
    if size is None or input_size is None or not isinstance(stride, int):
        return [], []
    want = tuple(int(v) // stride for v in input_size)
    if tuple(size) == want:
        return [], [f'model.{where}.in_featuremap_size {tuple(size)} = input_size {tuple(input_size)} / stride '
                    f'{stride}: unchanged (Conv2Former\'s map has the same stride)']
    delta['in_featuremap_size'] = want
    return [f'model.{where}.in_featuremap_size: {tuple(size)} -> {want} (input_size {tuple(input_size)} / '
            f'stride {stride})'], []


def swap_backbone(src: str, arch: Union[str, dict], dst: str, pretrained: Optional[str] = None,
                  layer_decay: Optional[float] = None, drop_path_rate: Optional[float] = None,
                  force: bool = False) -> SwapResult:
    """Write ``dst``: ``src`` with its backbone replaced by Conv2Former.

    Args:
        src: a config path, or ``mmdet::...``, ``mmseg::...``, ``mmpretrain::...``,
            ``mmpose::...``, ``mmaction::...``.
        arch: a Conv2Former arch name or dict (see :meth:`Conv2Former.parse_arch`).
        dst: the delta config to write.
        pretrained: a Conv2Former checkpoint (the release's or converted) for
            the backbone's ``init_cfg``. Defaults to None (random init).
        layer_decay: use :class:`LayerDecayOptimWrapperConstructor` with this
            layer-wise rate. Defaults to None (the source's optimiser setup,
            except that a ConvNeXt-only decay constructor is replaced by ours).
        drop_path_rate: defaults to our configs' rate for the arch.
        force: overwrite an existing ``dst``. Defaults to False.

    Raises:
        SwapError: what could not be mapped and what to set by hand.
        FileExistsError: ``dst`` exists and ``force`` is False.
    """
    settings = Conv2Former.parse_arch(arch)
    arch_key = arch.lower().replace('-', '_') if isinstance(arch, str) else None
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f'--layer-decay must be in (0, 1], got {layer_decay}')
    if drop_path_rate is None:
        drop_path_rate = DROP_PATH_RATES.get(arch_key, 0.1)
    path = resolve_config(src)
    dst = osp.abspath(dst)
    if osp.realpath(dst) == osp.realpath(path):
        raise ValueError(f'the output {dst} is the source config itself, which it inherits from; '
                         'choose another -o')
    if osp.exists(dst) and not force:
        raise FileExistsError(f'{dst} exists; pass --force to overwrite it')
    if not dst.endswith('.py'):
        raise ValueError(f'the output must be a .py config, got {dst!r}')

    cfg = Config.fromfile(path)
    library = _library(cfg)
    model = cfg.get('model')
    if not isinstance(model, dict) or not isinstance(model.get('backbone'), dict):
        raise SwapError(src, ['the config has no model.backbone (wrappers such as semi-supervised '
                              'detectors keep it under model.detector: swap the inner config)'])
    old_type = _type_name(model.backbone)
    pre = model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    if library == 'mmaction' and pre.get('format_shape', 'NCHW') != 'NCHW':
        raise SwapError(src, [
            f'the model reads {pre["format_shape"]} input ({_type_name(model)} with the '
            f'{old_type} backbone): Conv2Former is a 2D backbone that sees single frames. Start from a 2D '
            "recognizer's config (Recognizer2D, data_preprocessor.format_shape='NCHW', e.g. TSN or TSM)"])
    try:
        old_channels, old_strides = probe_backbone(_plain(model.backbone), library, src)
        segments = None
    except SwapError:
        # A backbone that shifts features between the frames of a clip (TSM)
        # runs only on whole clips: the head's or its own number of segments.
        from .engine.runtime import config_argument
        segments = config_argument(model.backbone, 'num_segments', _registry(library)) \
            if library == 'mmaction' else None
        if not segments:
            raise
        old_channels, old_strides = probe_backbone(_plain(model.backbone), library, src, batch=segments)
    out_indices, notes, problems = map_stages(old_strides, library)
    if problems:  # the consumers cannot be mapped either
        raise SwapError(src, problems)
    changes: List[str] = []
    model_delta: Dict[str, Any] = {}
    neck = _plain(model.get('neck'))
    if out_indices[-1] < 3 and library == 'mmpose' and neck is None and len(out_indices) == 1:
        # HRNet-style: one high-resolution map computed through the whole
        # network. Conv2Former's map at that stride comes after one stage, so
        # the head reads all later stages too, resized and concatenated
        # (HRNetV2's representation, mmpose's own parameter-free neck).
        stride = 4 * 2 ** out_indices[0]
        out_indices = tuple(range(out_indices[0], 4))
        neck = model_delta['neck'] = dict(type='FeatureMapProcessor', concat=True)
        changes.append(f'model.neck: FeatureMapProcessor(concat=True) added: {old_type}\'s stride-{stride} '
                       f'output is computed through its whole depth, Conv2Former\'s after stage '
                       f'{out_indices[0]} only, so stages {list(out_indices)} are resized to stride {stride} '
                       'and concatenated for the head (as in mmpose\'s HRNetV2 configs)')
    elif out_indices[-1] < 3:
        problems.append(
            f'the source reads outputs at strides {list(old_strides)} only; Conv2Former\'s stages after '
            f'{out_indices[-1]} would run with nothing reading them (unused parameters, which also stop DDP '
            'training). Read the stride-32 output too (backbone out_indices and the consumers\' in_channels), '
            'or start from a config whose heads read stride 32 (for pose: the ResNet or Swin recipe)')
    new_channels = [settings['channels'][s] for s in out_indices]
    new_strides = [4 * 2 ** s for s in out_indices]
    if segments:
        notes.append(f'the source backbone mixes the frames of a clip (it runs on whole clips of '
                     f'num_segments={segments} frames only); Conv2Former sees each frame alone, so the model '
                     "becomes TSN-like: the head's consensus over the segments is its only temporal step")
    # What the heads read: the backbone's maps, or a channel-free neck's outputs.
    read_old, read_new = (old_channels, old_strides), (new_channels, new_strides)
    if isinstance(neck, dict) and not _reads_channels(neck):
        try:
            read_old = probe_neck(neck, library, old_channels, old_strides)
            read_new = probe_neck(neck, library, new_channels, new_strides)
        except Exception as exc:  # noqa: BLE001  (any failure: say which neck and why)
            raise SwapError(src, problems + [
                f'could not run model.neck ({_type_name(neck)}) on maps of the backbone\'s widths '
                f'({type(exc).__name__}: {exc}); set the channels of the heads behind it by hand']) from None
        if read_old[0] != old_channels:
            notes.append(f'model.neck ({_type_name(neck)}) has no channel arguments: the heads read its '
                         f'outputs, channels {read_old[0]} -> {read_new[0]}')
    consumers, consumer_problems = find_consumers(dict(model, neck=neck) if neck else model)
    problems += consumer_problems
    default_in_index = -1 if library == 'mmseg' else None  # mmseg heads read the last output by default
    if not problems:
        for where in consumers:
            consumer = _plain(_get(model, where))
            old, new = (old_channels, new_channels) if where.startswith('neck') else (read_old[0], read_new[0])
            delta, consumer_changes, consumer_problems = rewrite_consumer(
                consumer, where, old, new, default_in_index)
            problems += consumer_problems
            changes += consumer_changes
            if not where.startswith('neck'):
                fmap_change, fmap_note = _featuremap_size(consumer, where, read_new[1][-1], delta)
                changes += fmap_change
                notes += fmap_note
            key = where.split('[')[0]
            if '[' in where:  # lists replace as a whole in mmengine's configs
                full = model_delta.setdefault(key, _plain(model[key]))
                full[int(where.split('[')[1][:-1])].update(delta)
            else:
                model_delta[key] = delta
    if problems:
        raise SwapError(src, problems)

    backbone = dict(_delete_=True, type='Conv2Former', arch=arch_key or settings,
                    out_indices=out_indices, drop_path_rate=drop_path_rate)
    if library == 'mmaction':
        # mmaction2's recognizers take a backbone's single output out of its
        # tuple only for backbones they know come from mmpretrain (as its own
        # configs for mmpretrain backbones do); the name resolves to ours.
        backbone['type'] = 'mmpretrain.Conv2Former'
        changes.append("model.backbone.type 'mmpretrain.Conv2Former': mmaction2's Recognizer2D unpacks the "
                       "tuple of outputs only for backbones from mmpretrain's scope")
    if pretrained is not None:
        backbone['init_cfg'], why = _pretrained_init(pretrained, settings)
        changes.append(f'model.backbone.init_cfg: {pretrained} with prefix={backbone["init_cfg"]["prefix"]!r} '
                       f'({why})')
    model_delta = dict(backbone=backbone, **model_delta)
    if model.get('pretrained') is not None:  # mmseg's EncoderDecoder hands it to the backbone
        model_delta['pretrained'] = None
        changes.append(f'model.pretrained: {model.pretrained!r} -> None (the old backbone\'s weights)')
    top_level: Dict[str, Any] = {}
    for owner, name in ((model, 'model.data_preprocessor'), (cfg, 'data_preprocessor')):
        pre = owner.get('data_preprocessor')
        if isinstance(pre, dict) and (owner is model or 'mean' in pre):
            delta = _preprocessor_delta(pre, library)
            (model_delta if owner is model else top_level)['data_preprocessor'] = delta
            was = ', '.join(f'{k}={pre[k]}' for k in ('mean', 'std', 'bgr_to_rgb', 'to_rgb', 'rgb_to_bgr')
                            if k in pre)
            rgb = ("RGB frames, the source's channel order kept: mmaction2's decoders give RGB"
                   if library == 'mmaction' else 'RGB images')
            changes.append(f"{name}: Conv2Former's ImageNet mean/std on {rgb} (was {was})")
    if not any('data_preprocessor' in c for c in changes):
        notes.append('no data preprocessor with mean/std found: normalise the images with mean '
                     f'{MEAN}, std {STD}, in RGB order, where your pipeline does')
    if cfg.get('load_from'):
        top_level['load_from'] = None
        changes.append(f'load_from: {cfg.load_from!r} -> None (weights of the old backbone\'s model)')
    wrapper = cfg.get('optim_wrapper') or {}
    old_constructor = wrapper.get('constructor')
    if layer_decay is not None or old_constructor in NAME_BOUND_DECAY:
        old_pw = wrapper.get('paramwise_cfg') or {}
        rate = layer_decay if layer_decay is not None else old_pw.get('decay_rate', old_pw.get('layer_decay_rate'))
        decay_type = 'layer_wise' if layer_decay is not None else old_pw.get('decay_type', 'layer_wise')
        paramwise = dict(_delete_=True) if old_pw else {}  # the source's keys are ConvNeXt's
        paramwise.update(decay_rate=rate, decay_type=decay_type)
        top_level['optim_wrapper'] = dict(constructor='LayerDecayOptimWrapperConstructor',
                                          paramwise_cfg=paramwise)
        changes.append(f'optim_wrapper: constructor {old_constructor or "default"} -> '
                       f'LayerDecayOptimWrapperConstructor (decay_rate {rate}, {decay_type})'
                       + (f'; paramwise_cfg {_plain(old_pw)} replaced' if old_pw else ''))
    elif old_constructor == 'TSMOptimWrapperConstructor':
        # It sorts parameters by module class (convolutions, Linear, BatchNorm)
        # and refuses any other (Conv2Former's LayerNorm); mmengine's default
        # constructor gives the same multipliers by parameter kind and name.
        fc_lr5 = (wrapper.get('paramwise_cfg') or {}).get('fc_lr5', False)
        paramwise = dict(_delete_=True, bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0)
        if fc_lr5:
            paramwise['custom_keys'] = {'cls_head.fc_cls.weight': dict(lr_mult=5.0),
                                        'cls_head.fc_cls.bias': dict(lr_mult=10.0, decay_mult=0.0)}
        top_level['optim_wrapper'] = dict(constructor='DefaultOptimWrapperConstructor', paramwise_cfg=paramwise)
        changes.append('optim_wrapper: constructor TSMOptimWrapperConstructor (accepts convolution, Linear and '
                       'BatchNorm parameters only) -> DefaultOptimWrapperConstructor with its multipliers: biases '
                       'lr x2 and no weight decay, norms no weight decay'
                       + (', the classifier lr x5 (bias x10)' if fc_lr5 else ''))
    imports = (cfg.get('custom_imports') or {}).get('imports') or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    imports = [i for i in imports if i != 'mmconv2former'] + ['mmconv2former']

    settings_text = f'arch {arch_key!r}' if arch_key else f'arch {settings}'
    old_desc = ', '.join(f'{c}@{s}' for c, s in zip(old_channels, old_strides))
    new_desc = ', '.join(f'{c}@{4 * 2 ** s}' for c, s in zip(new_channels, out_indices))
    base = src if '::' in src else osp.relpath(path, osp.dirname(dst))
    same = [4 * 2 ** s for s in out_indices] == list(old_strides)
    lines = [f'backbone {old_type} (outputs channels@stride: {old_desc}) -> Conv2Former stages '
             f'{list(out_indices)} ({new_desc}){", the same strides" if same else ""}']
    lines += changes + notes
    if 'optim_wrapper' not in top_level and library == 'mmdet':
        lines.append("optimiser and schedule: the source's (our COCO configs use AdamW, lr 1e-4, weight "
                     'decay 0.05 and layer-wise lr decay 0.95: see --layer-decay)')
    elif 'optim_wrapper' not in top_level:
        lines.append("optimiser and schedule: the source's (--layer-decay adds layer-wise lr decay)")
    header = [f'# {osp.basename(src)} with a Conv2Former backbone ({settings_text}).',
              '# Written by tools/misc/swap_backbone.py as a delta over the source config:']
    for line in lines:
        header += textwrap.wrap(line, 100, initial_indent='#   ', subsequent_indent='#     ',
                                break_on_hyphens=False)
    body = [f'_base_ = {base!r}',
            f"custom_imports = dict(imports={imports!r}, allow_failed_imports=False)", '',
            f'model = {_fmt(model_delta)}']
    body += [f'{k} = {_fmt(v)}' for k, v in top_level.items()]
    text = '\n'.join(header + body) + '\n'

    # Parse the result before it replaces anything: a file that does not load
    # never reaches DST.
    os.makedirs(osp.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.py', prefix='.swap_', dir=osp.dirname(dst))
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        written = Config.fromfile(tmp)
        assert written.model.backbone.type == backbone['type'], written.model.backbone
        os.replace(tmp, dst)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return SwapResult(dst=dst, text=text, library=library, old_type=old_type, old_channels=old_channels,
                      old_strides=old_strides, out_indices=out_indices, new_channels=new_channels,
                      changes=changes, notes=notes)


# ----------------------------------------------------------------------------- checking
def _check_size(model_cfg: dict, size: int) -> int:
    """A side large enough that DETR-style two-stage detectors (which rank
    their queries among the encoder's tokens) find as many tokens (strides
    8-64) as they have queries."""
    two_stage = model_cfg.get('as_two_stage') or _type_name(model_cfg) in ('DINO', 'DDQDETR')
    queries = (model_cfg.get('num_queries') or 0) if two_stage else 0
    while sum((size // s) ** 2 for s in (8, 16, 32, 64)) < queries:
        size += 32
    return size


def check_config(path: str, size: int = 224, batch: int = 2) -> Dict[str, Any]:
    """Build the model of ``path`` (CPU), run one training step of its
    optimiser on a synthetic batch and one prediction.

    Returns ``loss``, ``params``, ``backbone_params``, ``predictions`` (the
    number of results), ``size`` (the side asked for, raised for DETR-style
    detectors) and ``shape`` (the images' ``(H, W)``: a pose model's codec
    decides its own). Raises if a loss is not finite or a prediction is
    missing.
    """
    from mmengine.logging import MMLogger
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper

    from .engine.runtime import adapt_to_device, synthetic_batch
    # init_weights logs every parameter's initialiser at INFO: keep warnings only
    MMLogger.get_instance(f'swap_check_{id(path)}', log_level='WARNING')
    cfg = Config.fromfile(path)
    library = _library(cfg)
    adapt_to_device(cfg)
    if cfg.get('data_preprocessor') is not None:  # what mmengine's Runner does with a top-level one
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    pre = cfg.model.get('data_preprocessor')
    if isinstance(pre, dict):
        pre.pop('batch_augments', None)  # fixed-size pads and random resizes: not for a smoke test
        if pre.get('size') is not None:
            pre['size'] = (size, size)
    size = _check_size(cfg.model, size)
    if isinstance(pre, dict) and pre.get('size') is not None:
        pre['size'] = (size, size)
    registry = _registry(library)
    with DefaultScope.overwrite_default_scope(library):
        model = revert_sync_batchnorm(registry.build(cfg.model))
        model.init_weights()
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        model.train()
        data = synthetic_batch(cfg.model, library, size, batch)
        shape = tuple(int(v) for v in data['inputs'][0].shape[-2:])  # a pose codec's own input size
        log_vars = model.train_step(data, wrapper)
        loss = float(log_vars['loss'].detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f'the training step of {path} gave a non-finite loss: {log_vars}')
        model.eval()
        with torch.no_grad():
            results = model.test_step(synthetic_batch(cfg.model, library, size, batch))
    if len(results) != batch:
        raise RuntimeError(f'prediction returned {len(results)} results for {batch} images')
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return dict(loss=loss, params=count(model), backbone_params=count(model.backbone),
                predictions=len(results), size=size, shape=shape, library=library)
