"""Inference-only rewrites of a copy of the model, so that ONNX can express it
for every input size; the model itself is left untouched."""
import copy

import torch
import torch.nn as nn

from .errors import ExportError


class AdaptiveAvgPool2dExport(nn.Module):
    """``nn.AdaptiveAvgPool2d`` written as two small matrix products.

    ONNX has no adaptive pooling: torch's exporter writes it as an AveragePool
    only when the input size is known and a multiple of the output size, so
    the pyramid pooling of UperNet/PSPNet (bins 2, 3, 6 over a stride-32 map)
    exports neither dynamically nor at most fixed sizes (3x3 -> 2x2). Here
    bin ``i`` of ``o`` over ``n`` inputs averages inputs
    ``[floor(i n / o), ceil((i + 1) n / o))``, as torch's kernel does, through
    an ``(o, n)`` averaging matrix built from the traced input size.

    Args:
        output_size: ``o`` or ``(oh, ow)``; None in a pair keeps that side.
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


def _switch_to_deploy(model: nn.Module, name: str) -> None:
    """Every submodule's ``switch_to_deploy()`` (Conv2Former, mmpretrain's
    RepVGG/MobileOne): the one-way folding into its inference form."""
    targets = [m for m in model.modules() if callable(getattr(m, 'switch_to_deploy', None))]
    if not targets:
        raise ExportError(f'switch_to_deploy: no module of {name} has a switch_to_deploy() method')
    for module in targets:
        module.switch_to_deploy()


def _replace_adaptive_pooling(model: nn.Module) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            # a 1x1 output is a global average, which ONNX has
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
                setattr(module, child_name, AdaptiveAvgPool2dExport(child.output_size))


def exportable_copy(model: nn.Module, switch_to_deploy: bool = False) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every
    ``nn.AdaptiveAvgPool2d`` whose output is not 1x1 replaced by
    :class:`AdaptiveAvgPool2dExport`; with ``switch_to_deploy``, every
    submodule that has a ``switch_to_deploy()`` rewritten into its inference
    form first."""
    graph_model = copy.deepcopy(model).eval()
    if switch_to_deploy:
        _switch_to_deploy(graph_model, type(model).__name__)
    _replace_adaptive_pooling(graph_model)
    return graph_model
