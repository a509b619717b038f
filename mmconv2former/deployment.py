"""Export trained models to ONNX and check the file against PyTorch.

What is exported, per kind of model (the graph always starts from raw pixels:
``float32 (N, 3, H, W)`` in the channel order the config's test pipeline
produces, i.e. BGR as ``LoadImageFromFile`` reads it; the data preprocessor's
channel flip, mean/std normalisation and padding are inside the graph):

* mmpretrain ``ImageClassifier``: ``logits (N, num_classes)``.
* mmseg ``EncoderDecoder`` (UperNet, ...): ``seg_logits (N, C, H, W)`` at the
  input size and ``seg_labels (N, H, W)``: whole-image inference, as
  ``model.predict`` with ``test_cfg.mode='whole'``.
* mmdet single-stage detectors (RetinaNet, FCOS, ...): the dense head's raw
  per-level outputs (``cls_score_0..``, ``bbox_pred_0..``, ...). Anchors, box
  decoding and NMS stay outside the graph.
* any of them with ``features=True``: backbone (+ neck) feature maps
  ``feat_0..``; the only choice for two-stage detectors, whose path from the
  RPN to the RoI heads (proposal decoding, NMS, RoI cropping) is per-image
  Python with branches on data-dependent box counts, which tracing would
  freeze.

The graph calls the model through its public API only (``extract_feat``,
``forward(mode='tensor')``, ``encode_decode``), so what runs is exactly the
model's own code. ``onnx``/``onnxruntime`` are imported only where used:
``pip install -e .[deploy]`` (``requirements/deploy.txt``).
"""
import copy
import importlib
import json
import os
import os.path as osp
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine.runtime import innermost_dataset

# Side of the blank image run once to count a model's outputs: big enough that
# an FPN's extra levels (stride 64, 128) are 2x2, which GroupNorm heads need.
PROBE_SIZE = 256
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class ExportError(ValueError):
    """A model or request this exporter cannot handle; the message says what
    is unsupported, why, and what to do instead."""


# ----------------------------------------------------------------------------- model
def load_model(config: str, checkpoint: str, cfg_options: Optional[dict] = None
               ) -> Tuple[nn.Module, 'object', str]:
    """Build the config's model, load ``checkpoint`` strictly, ``eval()`` it.

    Returns ``(model, cfg, library)`` with ``library`` one of ``'mmdet'``,
    ``'mmseg'``, ``'mmpretrain'`` (from the config's ``default_scope``).
    """
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    from .engine.runtime import detect_library, load_config

    # a copy: mmengine's merge pops `_delete_` out of the dicts it is given
    cfg = load_config(config, copy.deepcopy(cfg_options))
    library = detect_library(cfg)
    init_default_scope(library)
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint!r}')
    model = MODELS.build(cfg.model)
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


# ----------------------------------------------------------------------------- preprocessing
class Preprocess(nn.Module):
    """The data preprocessor's test-time work on a batch of raw pixels:
    channel flip, ``(x - mean) / std``, then padding at the bottom/right up
    to a multiple of ``size_divisor`` and/or to at least ``size``, with
    ``pad_value`` (padding comes after normalisation, as in mmengine, mmdet,
    mmseg and mmpretrain)."""

    def __init__(self, flip_channels: bool = False, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None, size_divisor: int = 1,
                 size: Optional[Tuple[int, int]] = None, pad_value: float = 0.0) -> None:
        super().__init__()
        self.flip_channels = flip_channels
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer('mean', mean.detach().float().reshape(1, -1, 1, 1).clone())
            self.register_buffer('std', std.detach().float().reshape(1, -1, 1, 1).clone())
        self.size_divisor = int(size_divisor or 1)
        self.size = tuple(size) if size is not None else None
        self.pad_value = float(pad_value)

    @property
    def pads(self) -> bool:
        return self.size_divisor > 1 or self.size is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_channels:
            x = x.flip(1)
        if self.normalize:
            x = (x - self.mean) / self.std
        if self.pads:
            h, w = x.shape[-2:]
            pad_h, pad_w = self._pad_amount(h, 0), self._pad_amount(w, 1)
            x = F.pad(x, (0, pad_w, 0, pad_h), value=self.pad_value)
        return x

    def _pad_amount(self, n, axis: int):
        # written with tensor-friendly arithmetic: under tracing n is a traced
        # size, so the padding follows a dynamic input size
        target = n
        if self.size_divisor > 1:
            target = (n + self.size_divisor - 1) // self.size_divisor * self.size_divisor
        if self.size is not None:
            target = torch.clamp(torch.as_tensor(target), min=self.size[axis]) \
                if isinstance(target, torch.Tensor) else max(target, self.size[axis])
        return target - n


def _isinstance(obj, module: str, name: str) -> bool:
    """``isinstance(obj, module.name)``, False where that library is not installed."""
    try:
        return isinstance(obj, getattr(importlib.import_module(module), name))
    except ImportError:
        return False


def preprocess_from(data_preprocessor: nn.Module) -> Preprocess:
    """Read a :class:`Preprocess` off the model's data preprocessor."""
    dp = data_preprocessor
    mean = getattr(dp, 'mean', None) if getattr(dp, '_enable_normalize', False) else None
    std = getattr(dp, 'std', None) if mean is not None else None
    if _isinstance(dp, 'mmseg.models.data_preprocessor', 'SegDataPreProcessor'):
        test_cfg = dp.test_cfg or {}  # mmseg pads at test time only with a test_cfg
        return Preprocess(bool(dp.channel_conversion), mean, std,
                          size_divisor=test_cfg.get('size_divisor') or 1,
                          size=test_cfg.get('size'), pad_value=dp.pad_val)
    if _isinstance(dp, 'mmpretrain.models.utils.data_preprocessor', 'ClsDataPreprocessor'):
        return Preprocess(bool(dp.to_rgb), mean, std, dp.pad_size_divisor, None, dp.pad_value)
    if _isinstance(dp, 'mmengine.model', 'ImgDataPreprocessor'):  # and mmdet's subclass
        return Preprocess(bool(dp._channel_conversion), mean, std, dp.pad_size_divisor,
                          None, dp.pad_value)
    raise ExportError(
        f'unsupported data preprocessor {type(dp).__name__}: the exporter knows mmengine\'s '
        'ImgDataPreprocessor (and mmdet\'s DetDataPreprocessor), mmseg\'s SegDataPreProcessor '
        'and mmpretrain\'s ClsDataPreprocessor, whose test-time work (channel flip, '
        'mean/std, padding) it puts into the graph.')


# ----------------------------------------------------------------------------- graphs
@dataclass
class ExportSpec:
    """What one exported graph computes."""
    kind: str                 # 'classifier', 'segmentor', 'detector', 'features'
    module: nn.Module         # raw pixels -> tuple of outputs
    output_names: List[str]
    reference: Callable[[List[torch.Tensor]], List[torch.Tensor]]  # the library's own route
    description: str


class _Graph(nn.Module):
    """``preprocess`` then ``fn(model, x)``, outputs flattened to a tuple."""

    def __init__(self, model: nn.Module, preprocess: Preprocess,
                 fn: Callable[[nn.Module, torch.Tensor], Sequence[torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.fn = fn

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.fn(self.model, self.preprocess(images)))


def _flatten(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    flat: List[torch.Tensor] = []
    for item in outputs:
        flat += _flatten(item)
    return flat


def _preprocessed(model: nn.Module, images: List[torch.Tensor], data_samples=None) -> dict:
    """The model's own data preprocessor on a list of ``(3, H, W)`` images."""
    data = dict(inputs=list(images))
    if data_samples is not None:
        data['data_samples'] = data_samples
    return model.data_preprocessor(data, False)


def _features_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess,
                   what: str) -> ExportSpec:
    def fn(m, x):
        return _flatten(m.extract_feat(x))

    def reference(images):
        return _flatten(model.extract_feat(_preprocessed(model, images)['inputs']))

    with torch.no_grad():
        n = len(fn(model, torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)))
    return ExportSpec('features', _Graph(graph_model, preprocess, fn), [f'feat_{i}' for i in range(n)],
                      reference, f'{what}: feature maps (backbone + neck), finest first')


def _classifier_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess) -> ExportSpec:
    if not getattr(model, 'with_head', True):
        raise ExportError('this classifier has no head; export it with --features')

    def fn(m, x):
        return _flatten(m(x, mode='tensor'))

    def reference(images):
        return _flatten(model(_preprocessed(model, images)['inputs'], mode='tensor'))

    return ExportSpec('classifier', _Graph(graph_model, preprocess, fn), ['logits'], reference,
                      'image classifier: class logits (apply softmax for scores)')


def _segmentor_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess) -> ExportSpec:
    from mmseg.structures import SegDataSample

    mode = (getattr(model, 'test_cfg', None) or {}).get('mode', 'whole')
    if mode != 'whole':
        warnings.warn(f"the config tests with test_cfg.mode={mode!r}; the exported graph runs "
                      "whole-image inference (mode='whole'), as model.predict does with it")
    binary = model.out_channels == 1
    heads = model.decode_head  # a ModuleList in CascadeEncoderDecoder: the last one predicts
    head = heads[-1] if isinstance(heads, nn.ModuleList) else heads
    threshold = getattr(head, 'threshold', None)
    threshold = 0.3 if threshold is None else float(threshold)  # mmseg's default

    class SegGraph(_Graph):
        def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            x = self.preprocess(images)
            # the decode head resizes its logits to pad_shape, as in model.predict
            metas = [dict(img_shape=x.shape[2:], pad_shape=x.shape[2:])]
            logits = self.model.encode_decode(x, metas)
            if self.preprocess.pads:  # padding is at the bottom/right: crop it off
                logits = logits[:, :, :images.shape[2], :images.shape[3]]
            return logits, _labels(logits, binary, threshold)

    def reference(images):
        samples = [SegDataSample(metainfo=dict(img_shape=tuple(im.shape[1:]),
                                               ori_shape=tuple(im.shape[1:]))) for im in images]
        data = _preprocessed(model, images, samples)
        results = model.predict(data['inputs'], data['data_samples'])
        logits = torch.stack([r.seg_logits.data for r in results])
        if binary:  # postprocess_result keeps sigmoid scores for one channel
            logits = torch.logit(logits.clamp(1e-7, 1 - 1e-7))
        return [logits, torch.stack([r.pred_sem_seg.data[0] for r in results]).long()]

    return ExportSpec('segmentor', SegGraph(graph_model, preprocess, None), ['seg_logits', 'seg_labels'],
                      reference, 'segmentor: per-pixel class logits at the input size and their '
                      'labels (whole-image inference)')


def _labels(logits: torch.Tensor, binary: bool, threshold: float) -> torch.Tensor:
    if binary:
        return (logits.sigmoid() > threshold).long()[:, 0]
    return logits.argmax(1)


def _detector_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess) -> ExportSpec:
    from mmdet.models.detectors import SingleStageDetector, TwoStageDetector

    name = type(model).__name__
    if isinstance(model, TwoStageDetector):
        raise ExportError(
            f'{name} is a two-stage detector: only its backbone + neck can be exported. Between '
            'the RPN and the RoI heads, mmdet decodes proposals, runs NMS and crops RoIs per '
            'image in Python, with branches on how many boxes are left (InstanceData, '
            '`if rois.shape[0] == 0`): tracing would freeze the example image\'s box counts and '
            'branches into the graph (mmdeploy rewrites those functions for export). '
            'Pass --features to export backbone + neck feature maps and run the RPN and RoI '
            'heads in PyTorch, or use a single-stage detector (RetinaNet, FCOS: '
            'configs/retinanet/) for a graph up to the raw class scores and box regressions.')
    if not isinstance(model, SingleStageDetector) or not hasattr(model, 'bbox_head'):
        raise ExportError(
            f'{name} is not a detector this exporter knows: full export covers mmdet '
            'single-stage detectors (RetinaNet, FCOS, ATSS, ...: backbone, neck and dense head '
            'up to the raw per-level outputs). Pass --features to export backbone + neck only.')

    def fn(m, x):
        return _flatten(m(x, mode='tensor'))

    def reference(images):
        return _flatten(model(_preprocessed(model, images)['inputs'], mode='tensor'))

    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE), mode='tensor')
    # name the per-level lists after the head's predict_by_feat arguments
    import inspect
    params = [p for p in inspect.signature(model.bbox_head.predict_by_feat).parameters
              if p not in ('self',)]
    names = []
    for i, level_outputs in enumerate(outputs):
        base = params[i] if i < len(params) else f'output{i}'
        base = base[:-1] if base.endswith('s') else base
        names += [f'{base}_{j}' for j in range(len(_flatten(level_outputs)))]
    return ExportSpec('detector', _Graph(graph_model, preprocess, fn), names, reference,
                      f'{name}: raw per-level outputs of {type(model.bbox_head).__name__} '
                      '(no anchors, box decoding or NMS)')


class AdaptiveAvgPool2dExport(nn.Module):
    """``nn.AdaptiveAvgPool2d`` written as two small matrix products.

    ONNX has no adaptive pooling: torch's exporter writes it as an AveragePool
    only when the input size is known and a multiple of the output size, so
    the pyramid pooling of UperNet/PSPNet (bins 2, 3, 6 over a stride-32 map)
    exports neither dynamically nor at most fixed sizes (3x3 -> 2x2). Here
    bin ``i`` of ``o`` over ``n`` inputs averages inputs
    ``[floor(i n / o), ceil((i + 1) n / o))``, as torch's kernel does, through
    an ``(o, n)`` averaging matrix built from the traced input size.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.output_size = size

    @staticmethod
    def _matrix(n, o: int, like: torch.Tensor) -> torch.Tensor:
        i = torch.arange(o, device=like.device)
        start = (i * n) // o
        end = ((i + 1) * n + o - 1) // o
        j = torch.arange(n, device=like.device)
        inside = ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(like.dtype)
        return inside / inside.sum(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = self.output_size
        if oh is not None:
            x = torch.matmul(self._matrix(h, oh, x), x)
        if ow is not None:
            x = torch.matmul(x, self._matrix(w, ow, x).t())
        return x


def exportable_copy(model: nn.Module, switch_to_deploy: bool = False) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every
    ``nn.AdaptiveAvgPool2d`` whose output is not 1x1 (a global average, which
    ONNX has) replaced by :class:`AdaptiveAvgPool2dExport`; with
    ``switch_to_deploy``, every submodule that has a ``switch_to_deploy()``
    (Conv2Former, mmpretrain's RepVGG/MobileOne) rewritten into its inference
    form first."""
    graph_model = copy.deepcopy(model).eval()
    if switch_to_deploy:
        targets = [m for m in graph_model.modules() if callable(getattr(m, 'switch_to_deploy', None))]
        if not targets:
            raise ExportError(f'switch_to_deploy: no module of {type(model).__name__} has a '
                              'switch_to_deploy() method')
        for module in targets:
            module.switch_to_deploy()
    for name, module in list(graph_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if size not in (1, (1, 1)):
                    setattr(module, child_name, AdaptiveAvgPool2dExport(size))
    return graph_model


def build_spec(model: nn.Module, library: str, features: bool = False,
               switch_to_deploy: bool = False) -> ExportSpec:
    """What to export for ``model``; :class:`ExportError` when it cannot be.

    The graph is traced from a copy of ``model`` in which the few modules that
    ONNX cannot express for every input size are replaced by exact equivalents
    (:func:`exportable_copy`), and, with ``switch_to_deploy``, the backbone in
    its folded inference form; the reference that ``verify`` compares against
    is ``model`` itself, untouched.
    """
    preprocess = preprocess_from(model.data_preprocessor)
    graph_model = exportable_copy(model, switch_to_deploy)
    name = type(model).__name__
    if features:
        if not hasattr(model, 'extract_feat'):
            raise ExportError(f'{name} has no extract_feat(); --features needs an OpenMMLab '
                              'model with a backbone')
        return _features_spec(model, graph_model, preprocess, name)
    if library == 'mmpretrain':
        from mmpretrain.models.classifiers import ImageClassifier
        if isinstance(model, ImageClassifier):
            return _classifier_spec(model, graph_model, preprocess)
    elif library == 'mmseg':
        from mmseg.models.segmentors import EncoderDecoder
        if isinstance(model, EncoderDecoder):
            return _segmentor_spec(model, graph_model, preprocess)
    elif library == 'mmdet':
        return _detector_spec(model, graph_model, preprocess)
    raise ExportError(
        f'{name} ({library}) is not a model type this exporter knows. Supported: mmpretrain '
        "ImageClassifier, mmseg EncoderDecoder (and CascadeEncoderDecoder), mmdet single-stage "
        'detectors; --features exports backbone + neck of any of them and of two-stage detectors.')


# ----------------------------------------------------------------------------- export
def export_onnx(spec: ExportSpec, path: str, shape: Tuple[int, int] = (224, 224),
                dynamic: bool = False, opset: Optional[int] = None,
                exporter: str = 'torchscript', force: bool = False,
                metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``spec.module`` to ``path`` as ONNX and check it with ``onnx.checker``.

    Args:
        shape: ``(H, W)`` of the example input; the graph's fixed input size
            unless ``dynamic``.
        dynamic: batch, height and width as named dynamic axes (any size
            >= 32 that the PyTorch model takes, multiple of 32 or not).
        opset: ONNX opset; defaults to 17 for TorchScript (LayerNormalization
            is a single op from 17 on), 18 for the dynamo exporter (its minimum).
        exporter: ``'torchscript'`` (``torch.onnx.export(dynamo=False)``:
            seconds, dynamic axes work for any size) or ``'dynamo'`` (the
            ``torch.export``-based exporter, needs ``onnxscript``: much slower to
            export; dynamic sizes are inferred with ``Dim.AUTO``).
        force: overwrite an existing ``path``.
    """
    if osp.exists(path) and not force:
        raise FileExistsError(f'{path!r} exists; pass --force to overwrite it, or choose '
                              'another output with -o')
    if exporter not in ('torchscript', 'dynamo'):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    h, w = shape
    if min(h, w) < 32:
        raise ValueError(f'--shape {h} {w}: Conv2Former needs both sides >= 32 (its total stride)')
    opset = opset or (17 if exporter == 'torchscript' else 18)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    module = spec.module.eval()  # the wrapper's mode is restored after export: keep it eval
    # A dynamic batch is traced from two images: torch.export specialises a size-1 dim.
    example = torch.rand(2 if dynamic and exporter == 'dynamo' else 1, 3, h, w) * 255
    tmp = path + '.part'
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
            if exporter == 'torchscript':
                axes = None
                if dynamic:
                    axes = {'images': {0: 'batch', 2: 'height', 3: 'width'},
                            **{n: {0: 'batch'} for n in spec.output_names}}
                torch.onnx.export(module, (example,), tmp, dynamo=False, opset_version=opset,
                                  input_names=['images'], output_names=spec.output_names,
                                  dynamic_axes=axes, do_constant_folding=True)
            else:
                auto = torch.export.Dim.AUTO
                dyn = {'images': {0: auto, 2: auto, 3: auto}} if dynamic else None
                program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                            input_names=['images'], output_names=spec.output_names,
                                            dynamic_shapes=dyn, external_data=False)
                program.save(tmp, external_data=False)
    except Exception as exc:  # an op or a construct the exporter cannot take
        if osp.exists(tmp):
            os.remove(tmp)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        other = 'dynamo' if exporter == 'torchscript' else 'torchscript'
        raise ExportError(
            f'torch.onnx ({exporter} exporter, opset {opset}) could not export the {spec.kind} '
            f'graph: {type(exc).__name__}: {first}\n(the exporter\'s own error is chained to '
            f'this one). Try the other exporter (--exporter {other}), a higher --opset, or '
            '--features to export only backbone + neck.') from exc
    import onnx
    proto = onnx.load(tmp)
    onnx.checker.check_model(proto)
    info = {'mmconv2former.kind': spec.kind, 'mmconv2former.description': spec.description,
            'mmconv2former.input': 'images: float32 (N, 3, H, W) raw pixels, channel order as '
                                   "the config's test pipeline loads them (BGR); the model's "
                                   'normalisation and padding are in the graph',
            **(metadata or {})}
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- verification
def test_pipeline(cfg) -> Optional[list]:
    """The config's test pipeline up to the packing, without annotation
    loading (what is left turns a file into the image the model sees), or None."""
    loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    pipeline = None
    if loader is not None:
        pipeline = innermost_dataset(loader.get('dataset', {})).get('pipeline')
    pipeline = pipeline or cfg.get('test_pipeline')
    if not pipeline:
        return None
    return [t for t in pipeline
            if not str(t.get('type', '')).split('.')[-1].startswith(('LoadAnnotations', 'Pack'))]


def config_images(cfg, limit: int = 4) -> List[str]:
    """Up to ``limit`` images of the config's test set, if they are on disk."""
    loader = cfg.get('test_dataloader') or cfg.get('val_dataloader') or {}
    ds = innermost_dataset(loader.get('dataset', {})) or {}
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


def generated_image(size: Tuple[int, int], directory: str) -> str:
    """Write a textured test scene (the segmentation demo's generator) as PNG
    and return its path."""
    from PIL import Image

    from .datasets.materials import make_material_scene
    scene = make_material_scene(np.random.default_rng(0), size=tuple(size))
    path = osp.join(directory, 'generated_scene.png')
    Image.fromarray(scene.image).save(path)
    return path


def load_images(cfg, library: str, paths: Sequence[str]) -> List[torch.Tensor]:
    """Each image as the config's test pipeline hands it to the model: a
    ``(3, H, W)`` uint8 tensor (BGR as mmcv reads it, resized as the pipeline
    resizes), or the file as mmcv reads it when the config has no pipeline."""
    import mmcv
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    init_default_scope(library)
    pipeline = test_pipeline(cfg)
    compose = Compose(pipeline) if pipeline else None
    images = []
    for i, path in enumerate(paths):
        if compose is not None:
            img = compose(dict(img_path=path, img_id=i))['img']
        else:
            img = mmcv.imread(path)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        images.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))
    return images


def max_relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the
    output's scale (an elementwise ratio explodes where outputs cross zero)."""
    expected = expected.astype(np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    diff = float(np.abs(actual.astype(np.float64) - expected).max()) if expected.size else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class Comparison:
    name: str                   # which input
    shape: Tuple[int, ...]
    max_rel_diff: float         # over all float outputs
    worst_output: str
    label_agreement: Optional[float] = None  # % of equal labels (segmentors), top-1 (classifiers)
    labels: int = 0             # how many labels were compared
    label_mismatches: int = 0


def compare(session, spec: ExportSpec, images: List[torch.Tensor], name: str) -> Comparison:
    """Run the ONNX file and the PyTorch model (through its data preprocessor
    and the library's own inference route) on ``images`` (same size)."""
    batch = torch.stack([im.float() for im in images])
    onnx_out = session.run(spec.output_names, {'images': batch.numpy()})
    with torch.no_grad():
        torch_out = [t.detach().cpu().numpy() for t in spec.reference(images)]
    if len(onnx_out) != len(torch_out):
        raise RuntimeError(f'{len(onnx_out)} ONNX outputs but {len(torch_out)} PyTorch outputs')
    worst, worst_name, agreement, labels, mismatches = -1.0, '', None, 0, 0
    for out_name, a, b in zip(spec.output_names, onnx_out, torch_out):
        if a.shape != b.shape:
            raise RuntimeError(f'output {out_name}: ONNX shape {a.shape}, PyTorch {b.shape}')
        if np.issubdtype(b.dtype, np.integer):
            labels, mismatches = int(b.size), int((a != b).sum())
            continue
        diff = max_relative_difference(a, b)
        if diff > worst:
            worst, worst_name = diff, out_name
    if spec.kind == 'classifier':
        top1_onnx, top1_torch = onnx_out[0].argmax(-1), torch_out[0].argmax(-1)
        labels, mismatches = int(top1_torch.size), int((top1_onnx != top1_torch).sum())
    if labels:
        agreement = 100.0 * (labels - mismatches) / labels
    return Comparison(name, tuple(batch.shape), worst, worst_name, agreement, labels, mismatches)


def benchmark(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@dataclass
class VerifyReport:
    comparisons: List[Comparison]
    onnx_ms: float
    torch_ms: float         # the library's inference route (data preprocessor, post-processing)
    graph_ms: float         # the exported module itself, eager PyTorch
    timing_shape: Tuple[int, ...]
    tolerance: float
    min_agreement: float

    @property
    def max_rel_diff(self) -> float:
        return max(c.max_rel_diff for c in self.comparisons)

    @property
    def failures(self) -> List[str]:
        bad = [f'{c.name}: max relative difference {c.max_rel_diff:.2e} ({c.worst_output}) '
               f'> {self.tolerance:.0e}' for c in self.comparisons if c.max_rel_diff > self.tolerance]
        bad += [f'{c.name}: label agreement {c.label_agreement:.3f}% < {self.min_agreement}%'
                for c in self.comparisons
                if c.label_agreement is not None and c.label_agreement < self.min_agreement]
        return bad

    def lines(self) -> List[str]:
        out = []
        for c in self.comparisons:
            line = (f'{c.name:<40} {"x".join(map(str, c.shape)):<16} '
                    f'max rel diff {c.max_rel_diff:.2e} ({c.worst_output})')
            if c.label_agreement is not None:
                line += (f', labels equal {c.label_agreement:.3f}% '
                         f'({c.label_mismatches} of {c.labels} differ)')
            out.append(line)
        out.append(f'time per batch {"x".join(map(str, self.timing_shape))} (median): onnxruntime '
                   f'{self.onnx_ms:.1f} ms; PyTorch {self.torch_ms:.1f} ms through the library\'s '
                   f'inference route, {self.graph_ms:.1f} ms the exported module in eager mode '
                   f'({torch.get_num_threads()} torch threads)')
        out.append(f'worst max relative difference {self.max_rel_diff:.2e} '
                   f'(limit {self.tolerance:.0e}): {"FAIL" if self.failures else "ok"}')
        return out


def verify(path: str, spec: ExportSpec, real_images: List[Tuple[str, torch.Tensor]],
           shape: Tuple[int, int], dynamic: bool, tolerance: float = 1e-4,
           min_agreement: float = 99.9, repeat: int = 5, seed: int = 0) -> VerifyReport:
    """Compare ``path`` in onnxruntime with the PyTorch model.

    Inputs: each real image (resized to ``shape`` when the graph is static),
    a random image at ``shape`` and, when ``dynamic``, random batches at
    other sizes: two images whose sides are multiples of 32 and one image
    whose sides are not.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    h, w = shape
    comparisons = []
    for name, image in real_images:
        if not dynamic and tuple(image.shape[1:]) != (h, w):
            image = F.interpolate(image[None].float(), size=(h, w), mode='bilinear',
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            name += f' (resized to {h}x{w})'
        comparisons.append(compare(session, spec, [image], name))
    gen = torch.Generator().manual_seed(seed)

    def random_images(n, hh, ww):
        return [torch.randint(0, 256, (3, hh, ww), generator=gen, dtype=torch.uint8)
                for _ in range(n)]

    comparisons.append(compare(session, spec, random_images(1, h, w), 'random'))
    if dynamic:
        h32, w32 = (h + 31) // 32 * 32 + 32, (w + 31) // 32 * 32 + 64
        comparisons.append(compare(session, spec, random_images(2, h32, w32),
                                   'random, sides multiples of 32'))
        comparisons.append(compare(session, spec, random_images(1, h32 + 13, w32 - 25),
                                   'random, sides not multiples of 32'))
    images = random_images(1, h, w)
    batch = torch.stack([im.float() for im in images]).numpy()
    onnx_ms = benchmark(lambda: session.run(None, {'images': batch}), repeat)
    with torch.no_grad():
        torch_ms = benchmark(lambda: spec.reference(images), repeat)
        graph_ms = benchmark(lambda: spec.module(torch.from_numpy(batch)), repeat)
    return VerifyReport(comparisons, onnx_ms, torch_ms, graph_ms, (1, 3, h, w), tolerance,
                        min_agreement)


def default_shape(cfg, library: str) -> Tuple[int, int]:
    """The example input size when none is given: the config's ``crop_size``
    (mmseg), else 224x224 (classifiers) or 800x1344 (detectors)."""
    crop = cfg.get('crop_size')
    if library == 'mmseg' and isinstance(crop, (tuple, list)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    return (224, 224) if library == 'mmpretrain' else (800, 1344) if library == 'mmdet' \
        else (512, 512)


def class_names(model: nn.Module) -> Optional[List[str]]:
    meta = getattr(model, 'dataset_meta', None) or {}
    classes = meta.get('classes')
    return list(classes) if classes else None


def metadata_for(model: nn.Module, config: str, checkpoint: str) -> Dict[str, str]:
    from .version import __version__
    info = {'mmconv2former.version': __version__, 'mmconv2former.config': osp.basename(config),
            'mmconv2former.checkpoint': osp.basename(checkpoint)}
    classes = class_names(model)
    if classes:
        info['mmconv2former.classes'] = json.dumps(classes)
    return info


__all__ = ['ExportError', 'ExportSpec', 'Preprocess', 'VerifyReport', 'build_spec', 'export_onnx',
           'load_model', 'load_images', 'max_relative_difference', 'preprocess_from', 'verify']
