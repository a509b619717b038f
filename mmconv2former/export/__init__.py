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

The steps, one module each::

    model.py       load_model: config + whole-model checkpoint; default_shape
    preprocess.py  Preprocess: the data preprocessor's test-time work, in the graph
    specs.py       build_spec: what the graph computes per kind of model, and
                   the library's own route to the same numbers
    rewrites.py    exportable_copy: modules ONNX cannot express for every size,
                   replaced by exact equivalents; optional switch_to_deploy
    exporter.py    export_onnx: torch.onnx (TorchScript or dynamo), onnx.checker,
                   metadata
    images.py      real images for verification, through the test pipeline
    verify.py      verify: onnxruntime against PyTorch, and the time of both

``tools/deployment/export_onnx.py`` runs them in that order.
"""
from .errors import ExportError
from .exporter import export_onnx, metadata_for
from .images import config_images, find_images, load_images
from .model import default_shape, load_model
from .preprocess import Preprocess, preprocess_from
from .rewrites import AdaptiveAvgPool2dExport, exportable_copy
from .specs import ExportSpec, build_spec
from .verify import Comparison, VerifyReport, max_relative_difference, verify

__all__ = ['AdaptiveAvgPool2dExport', 'Comparison', 'ExportError', 'ExportSpec', 'Preprocess',
           'VerifyReport', 'build_spec', 'config_images', 'default_shape', 'export_onnx',
           'exportable_copy', 'find_images', 'load_images', 'load_model',
           'max_relative_difference', 'metadata_for', 'preprocess_from', 'verify']
