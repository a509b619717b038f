"""What one exported graph computes, per kind of model: the graph (raw pixels
in, a tuple of tensors out), its output names, and the library's own route to
the same numbers that :func:`~mmconv2former.export.verify` compares with."""
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import ExportError
from .preprocess import Preprocess, preprocess_from
from .rewrites import exportable_copy

# Side of the blank image run once to count a model's outputs: big enough that
# an FPN's extra levels (stride 64, 128) are 2x2, which GroupNorm heads need.
PROBE_SIZE = 256

Route = Callable[[nn.Module, torch.Tensor], List[torch.Tensor]]


@dataclass
class ExportSpec:
    """What one exported graph computes."""
    kind: str                 # 'classifier', 'segmentor', 'detector', 'features'
    module: nn.Module         # raw pixels -> tuple of outputs
    output_names: List[str]
    reference: Callable[[List[torch.Tensor]], List[torch.Tensor]]  # the library's own route
    description: str


class _Graph(nn.Module):
    """``preprocess`` then ``route(model, x)``, outputs flattened to a tuple."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, route: Route) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.route = route

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.route(self.model, self.preprocess(images)))


class _SegmentorGraph(nn.Module):
    """Whole-image inference of an mmseg ``EncoderDecoder``, as ``model.predict``
    does it: logits at the input size, and their labels."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, binary: bool,
                 threshold: float) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.binary = binary
        self.threshold = threshold

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        # the decode head resizes its logits to pad_shape, as in model.predict
        metas = [dict(img_shape=x.shape[2:], pad_shape=x.shape[2:])]
        logits = self.model.encode_decode(x, metas)
        if self.preprocess.pads:  # padding is at the bottom/right: crop it off
            logits = logits[:, :, :images.shape[2], :images.shape[3]]
        if self.binary:
            return logits, (logits.sigmoid() > self.threshold).long()[:, 0]
        return logits, logits.argmax(1)


def _flatten(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    flat: List[torch.Tensor] = []
    for item in outputs:
        flat += _flatten(item)
    return flat


def _extract_feat(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    return _flatten(model.extract_feat(x))


def _tensor_mode(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    return _flatten(model(x, mode='tensor'))


def _preprocessed(model: nn.Module, images: List[torch.Tensor], data_samples=None) -> dict:
    """The model's own data preprocessor on a list of ``(3, H, W)`` images."""
    data = dict(inputs=list(images))
    if data_samples is not None:
        data['data_samples'] = data_samples
    return model.data_preprocessor(data, False)


def _reference(model: nn.Module, route: Route):
    """``route`` on the output of the model's own data preprocessor."""
    return lambda images: route(model, _preprocessed(model, images)['inputs'])


def _count_outputs(model: nn.Module, route: Route) -> int:
    with torch.no_grad():
        return len(route(model, torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)))


def _features_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess) -> ExportSpec:
    name = type(model).__name__
    if not hasattr(model, 'extract_feat'):
        raise ExportError(f'{name} has no extract_feat(); --features needs an OpenMMLab '
                          'model with a backbone')
    n = _count_outputs(model, _extract_feat)
    return ExportSpec('features', _Graph(graph_model, preprocess, _extract_feat),
                      [f'feat_{i}' for i in range(n)], _reference(model, _extract_feat),
                      f'{name}: feature maps (backbone + neck), finest first')


def _classifier_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess) -> ExportSpec:
    if not getattr(model, 'with_head', True):
        raise ExportError('this classifier has no head; export it with --features')
    return ExportSpec('classifier', _Graph(graph_model, preprocess, _tensor_mode), ['logits'],
                      _reference(model, _tensor_mode),
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

    def reference(images):
        samples = [SegDataSample(metainfo=dict(img_shape=tuple(im.shape[1:]),
                                               ori_shape=tuple(im.shape[1:]))) for im in images]
        data = _preprocessed(model, images, samples)
        results = model.predict(data['inputs'], data['data_samples'])
        logits = torch.stack([r.seg_logits.data for r in results])
        if binary:  # postprocess_result keeps sigmoid scores for one channel
            logits = torch.logit(logits.clamp(1e-7, 1 - 1e-7))
        return [logits, torch.stack([r.pred_sem_seg.data[0] for r in results]).long()]

    return ExportSpec('segmentor', _SegmentorGraph(graph_model, preprocess, binary, threshold),
                      ['seg_logits', 'seg_labels'], reference,
                      'segmentor: per-pixel class logits at the input size and their '
                      'labels (whole-image inference)')


def _check_detector(model: nn.Module) -> None:
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


def _head_output_names(model: nn.Module) -> List[str]:
    """``cls_score_0``, ..., ``bbox_pred_0``, ...: each per-level list named
    after the matching argument of the head's ``predict_by_feat``."""
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE), mode='tensor')
    params = list(inspect.signature(model.bbox_head.predict_by_feat).parameters)
    names = []
    for i, level_outputs in enumerate(outputs):
        base = params[i] if i < len(params) else f'output{i}'
        base = base[:-1] if base.endswith('s') else base
        names += [f'{base}_{j}' for j in range(len(_flatten(level_outputs)))]
    return names


def _detector_spec(model: nn.Module, graph_model: nn.Module, preprocess: Preprocess) -> ExportSpec:
    _check_detector(model)
    return ExportSpec('detector', _Graph(graph_model, preprocess, _tensor_mode),
                      _head_output_names(model), _reference(model, _tensor_mode),
                      f'{type(model).__name__}: raw per-level outputs of '
                      f'{type(model.bbox_head).__name__} (no anchors, box decoding or NMS)')


def _full_spec_builder(model: nn.Module, library: str):
    """The spec builder for the whole of ``model``, or None."""
    if library == 'mmpretrain':
        from mmpretrain.models.classifiers import ImageClassifier
        return _classifier_spec if isinstance(model, ImageClassifier) else None
    if library == 'mmseg':
        from mmseg.models.segmentors import EncoderDecoder
        return _segmentor_spec if isinstance(model, EncoderDecoder) else None
    return _detector_spec if library == 'mmdet' else None


def build_spec(model: nn.Module, library: str, features: bool = False,
               switch_to_deploy: bool = False) -> ExportSpec:
    """What to export for ``model``; :class:`ExportError` when it cannot be.

    The graph is traced from a copy of ``model`` in which the few modules that
    ONNX cannot express for every input size are replaced by exact equivalents
    (:func:`~mmconv2former.export.exportable_copy`), and, with
    ``switch_to_deploy``, the backbone in its folded inference form; the
    reference that ``verify`` compares against is ``model`` itself, untouched.
    """
    preprocess = preprocess_from(model.data_preprocessor)
    builder = _features_spec if features else _full_spec_builder(model, library)
    if builder is None:
        raise ExportError(
            f'{type(model).__name__} ({library}) is not a model type this exporter knows. '
            'Supported: mmpretrain ImageClassifier, mmseg EncoderDecoder (and '
            'CascadeEncoderDecoder), mmdet single-stage detectors; --features exports '
            'backbone + neck of any of them and of two-stage detectors.')
    return builder(model, exportable_copy(model, switch_to_deploy), preprocess)
