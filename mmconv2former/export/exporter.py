"""Writing an :class:`~mmconv2former.export.ExportSpec` to an ONNX file."""
import json
import os
import os.path as osp
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .errors import ExportError
from .specs import ExportSpec

INPUT_DESCRIPTION = ("images: float32 (N, 3, H, W) raw pixels, channel order as the config's "
                     "test pipeline loads them (BGR); the model's normalisation and padding "
                     'are in the graph')


def _check_request(path: str, shape: Tuple[int, int], exporter: str, force: bool) -> None:
    if osp.exists(path) and not force:
        raise FileExistsError(f'{path!r} exists; pass --force to overwrite it, or choose '
                              'another output with -o')
    if exporter not in ('torchscript', 'dynamo'):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    h, w = shape
    if min(h, w) < 32:
        raise ValueError(f'--shape {h} {w}: Conv2Former needs both sides >= 32 (its total stride)')


def _trace(module: nn.Module, example: torch.Tensor, path: str, output_names, dynamic: bool,
           opset: int, exporter: str) -> None:
    """``torch.onnx.export`` with the chosen exporter, its warnings about the
    trace (Python values frozen into the graph, the legacy exporter) silenced."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
        if exporter == 'torchscript':
            axes = None
            if dynamic:
                axes = {'images': {0: 'batch', 2: 'height', 3: 'width'},
                        **{n: {0: 'batch'} for n in output_names}}
            torch.onnx.export(module, (example,), path, dynamo=False, opset_version=opset,
                              input_names=['images'], output_names=output_names,
                              dynamic_axes=axes, do_constant_folding=True)
        else:
            auto = torch.export.Dim.AUTO
            dyn = {'images': {0: auto, 2: auto, 3: auto}} if dynamic else None
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=['images'], output_names=output_names,
                                        dynamic_shapes=dyn, external_data=False)
            program.save(path, external_data=False)


def _check_and_annotate(path: str, metadata: Dict[str, str]) -> None:
    """``onnx.checker`` on the file, then ``metadata`` into its ``metadata_props``."""
    import onnx
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


def export_onnx(spec: ExportSpec, path: str, shape: Tuple[int, int] = (224, 224),
                dynamic: bool = False, opset: Optional[int] = None,
                exporter: str = 'torchscript', force: bool = False,
                metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``spec.module`` to ``path`` as ONNX and check it with ``onnx.checker``.

    Args:
        spec: what to export (:func:`~mmconv2former.export.build_spec`).
        path: the ONNX file to write; written whole or not at all.
        shape: ``(H, W)`` of the example input; the graph's fixed input size
            unless ``dynamic``. Defaults to (224, 224).
        dynamic: batch, height and width as named dynamic axes (any size
            >= 32 that the PyTorch model takes, multiple of 32 or not).
            Defaults to False.
        opset: ONNX opset; defaults to 17 for TorchScript (LayerNormalization
            is a single op from 17 on), 18 for the dynamo exporter (its minimum).
        exporter: ``'torchscript'`` (``torch.onnx.export(dynamo=False)``:
            seconds, dynamic axes work for any size) or ``'dynamo'`` (the
            ``torch.export``-based exporter, needs ``onnxscript``: much slower to
            export; dynamic sizes are inferred with ``Dim.AUTO``).
            Defaults to ``'torchscript'``.
        force: overwrite an existing ``path``. Defaults to False.
        metadata: extra ``metadata_props`` (:func:`metadata_for`). Defaults to None.

    Returns:
        ``path``.
    """
    _check_request(path, shape, exporter, force)
    opset = opset or (17 if exporter == 'torchscript' else 18)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    module = spec.module.eval()  # the wrapper's mode is restored after export: keep it eval
    # A dynamic batch is traced from two images: torch.export specialises a size-1 dim.
    example = torch.rand(2 if dynamic and exporter == 'dynamo' else 1, 3, *shape) * 255
    tmp = path + '.part'
    try:
        _trace(module, example, tmp, spec.output_names, dynamic, opset, exporter)
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
    _check_and_annotate(tmp, {'mmconv2former.kind': spec.kind,
                              'mmconv2former.description': spec.description,
                              'mmconv2former.input': INPUT_DESCRIPTION, **(metadata or {})})
    os.replace(tmp, path)
    return path


def metadata_for(model: nn.Module, config: str, checkpoint: str) -> Dict[str, str]:
    """What the file should say about where it comes from: the package
    version, the config and checkpoint names and, when the checkpoint has
    them, the class names (JSON)."""
    from ..version import __version__
    info = {'mmconv2former.version': __version__, 'mmconv2former.config': osp.basename(config),
            'mmconv2former.checkpoint': osp.basename(checkpoint)}
    classes = (getattr(model, 'dataset_meta', None) or {}).get('classes')
    if classes:
        info['mmconv2former.classes'] = json.dumps(list(classes))
    return info
