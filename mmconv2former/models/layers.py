"""Small layers the Conv2Former block is made of.

Layout convention: inside the network, after the stem, feature maps are kept
channels-last, i.e. shaped ``(B, H, W, C)``. That makes every channel
LayerNorm a plain, fused :func:`F.layer_norm` over the last dimension and
every 1x1 convolution a matrix product, which on CPU is 3-6x faster than the
same 1x1 convolution on NCHW data. Parameters keep the release's
``nn.Conv2d`` shapes (``[C_out, C_in, k, k]``), so official checkpoints load
unchanged and ``isinstance(m, nn.Conv2d)`` still holds for initialisers,
FLOP counters and optimiser rules.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _inference() -> bool:
    """True when autograd is off, so fresh intermediates may be overwritten."""
    return not torch.is_grad_enabled()


def _observed() -> bool:
    """True while something records the ops rather than just running them:
    ``torch.compile``, JIT tracing/scripting (ONNX export, mmengine's FLOP
    counter) or a Python dispatch mode (``FlopCounterMode``, fake tensors).
    Those get the plain ATen ops: FLOP counters know ``addmm`` but not the
    in-place ``addmm_``, tracers cannot take oneDNN's fused kernels, and
    Inductor fuses by itself."""
    # is_compiling first: Dynamo does not trace torch.jit's helpers
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or _get_current_dispatch_mode() is not None)


def _mkldnn_fusable(x: torch.Tensor) -> bool:
    """True where oneDNN's fused kernels may serve ("matrix product + bias",
    "convolution or matrix product + GELU": the epilogue is applied while the
    output is still in registers, instead of in a second pass over it): eager
    CPU inference in fp32 (the fused ops have no autograd formula), outside
    autocast (they would bypass it and run a bf16 model's products in fp32).
    """
    if _observed():  # first: Dynamo does not trace torch.backends
        return False
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and _inference()
            and not torch.is_autocast_enabled('cpu')
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def pointwise(x: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1x1 convolution of channels-last ``x`` as a matrix product.

    ``weight`` may keep its ``nn.Conv2d`` shape ``[C_out, C_in, 1, 1]``; it is
    viewed as ``[C_out, C_in]``.
    """
    weight = weight.flatten(1)
    if bias is None or x.device.type != 'cpu':
        return F.linear(x, weight, bias)  # GPU BLAS fuses the bias into the GEMM
    if _mkldnn_fusable(x):
        # oneDNN's matrix product adds the bias in its epilogue, while the
        # output is in registers. Measured (AMD EPYC, AVX2, 2 threads, the
        # backbone's shapes): 15-25% faster than MKL's GEMM followed by a
        # bias pass, and the whole backbone ~8% faster (paired A/B).
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
    # On CPU, F.linear(x, w, b) first broadcasts b into the output and then
    # runs the GEMM with beta=1: one more full write of the output than adding
    # b afterwards (measured 17% slower for a 29 MB stage-1 output, ~2% once
    # the output fits in cache). In place is autograd-safe: a GEMM's backward
    # never reads its output.
    return F.linear(x, weight).add_(bias)


class ConvNHWC(nn.Conv2d):
    """``nn.Conv2d`` whose input and output are channels-last ``(B, H, W, C)``.

    A 1x1, stride-1, ungrouped convolution is computed by :func:`pointwise`
    (a matrix product on the channel dimension): the same numbers, without
    im2col or layout changes. Other kernels (depthwise, patch merging) run as
    ``F.conv2d`` on a channels-last strided view, which oneDNN consumes
    without a copy. Layout per operation was measured (``benchmark.py
    --layout-probe``, T, batch 8, 224, x86 CPU): oneDNN's NCHW kernel for the
    11x11 depthwise conv alone is up to ~25% faster at some stages, but with
    the two layout conversions it needs it is 5-20% slower at every stage;
    the 3x3 conv of the 4C-wide MLP is 2.7-6x faster channels-last. So every
    stage stays channels-last.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.is_pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1)
                             and self.groups == 1 and self.padding in ((0, 0), 'valid'))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_pointwise:
            return pointwise(x, self.weight, self.bias)
        out = super().forward(x.permute(0, 3, 1, 2))
        return out.permute(0, 2, 3, 1)


class LayerNorm2d(nn.LayerNorm):
    """Channel LayerNorm for ``(B, C, H, W)`` tensors.

    The release normalises over channels by hand (mean, subtract, square,
    mean, sqrt); that is slower and, under fp16 autocast, the square overflows
    once late-stage activations pass ~256. ``F.layer_norm`` is fused and runs
    in fp32 under autocast. Subclassing ``nn.LayerNorm`` keeps optimiser rules
    such as "no weight decay on norms" working by ``isinstance``.
    Inside the backbone, where data are channels-last, a plain
    ``nn.LayerNorm`` plays this role; this class serves NCHW consumers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole residual branches per sample.

    Surviving samples are scaled by ``1 / keep_prob`` so that the expected
    value is unchanged and evaluation needs no rescaling.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path` (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f'drop_prob must be in [0, 1), got {drop_prob}')
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


__all__ = ['pointwise', 'ConvNHWC', 'LayerNorm2d', 'DropPath', 'drop_path']
