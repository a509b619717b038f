"""Small layers the Conv2Former block is made of.

Layout: after the stem, feature maps are kept channels-last, ``(B, H, W, C)``.
Every channel LayerNorm is then a plain, fused :func:`F.layer_norm` over the
last dimension and every 1x1 convolution a matrix product, 3-6x faster on CPU
than the same 1x1 convolution on NCHW data. Parameters keep the release's
``nn.Conv2d`` shapes (``[C_out, C_in, k, k]``), so official checkpoints load
unchanged and ``isinstance(m, nn.Conv2d)`` still holds for initialisers, FLOP
counters and optimiser rules.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.depthwise_conv import covers, depthwise_conv_nhwc


class ConvNHWC(nn.Conv2d):
    """``nn.Conv2d`` whose input and output are channels-last ``(B, H, W, C)``.

    A 1x1, stride-1, ungrouped convolution is a matrix product on the channel
    dimension (:func:`F.linear` on the weight viewed as ``[C_out, C_in]``):
    the same numbers, without im2col or layout changes. Other kernels
    (depthwise, patch merging) run as ``F.conv2d`` on a channels-last strided
    view, which oneDNN and cuDNN consume without a copy. (Measured on x86 CPUs:
    oneDNN's NCHW depthwise kernels are faster at some stages alone, but
    slower everywhere once the two layout conversions are paid for.)

    ``depthwise_impl='triton'`` (a depthwise convolution with "same" padding
    only) runs it through :func:`mmconv2former.ops.depthwise_conv.depthwise_conv_nhwc`:
    Triton kernels on CUDA tensors, ``F.conv2d`` elsewhere.
    """

    def __init__(self, *args, depthwise_impl: str = 'torch', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.is_pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1)
                             and self.groups == 1 and self.padding in ((0, 0), 'valid'))
        if depthwise_impl not in ('torch', 'triton'):
            raise ValueError(f"depthwise_impl must be 'torch' or 'triton', got {depthwise_impl!r}")
        if depthwise_impl == 'triton' and not covers(self):
            raise ValueError("depthwise_impl='triton' covers depthwise convolutions (groups == channels) "
                             'with stride 1 and an odd kernel padded by K // 2; this convolution is '
                             f'{super().extra_repr()}')
        self.depthwise_impl = depthwise_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_pointwise:
            return F.linear(x, self.weight.flatten(1), self.bias)
        if self.depthwise_impl == 'triton':
            return depthwise_conv_nhwc(x, self.weight, self.bias)
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + ", depthwise_impl='triton'" if self.depthwise_impl == 'triton' else extra


class LayerNorm2d(nn.LayerNorm):
    """Channel LayerNorm for ``(B, C, H, W)`` tensors.

    The release normalises over channels by hand (mean, subtract, square,
    mean, sqrt); that is slower and, under fp16 autocast, the square overflows
    once late-stage activations pass ~256. ``F.layer_norm`` is fused and runs
    in fp32 under autocast. Subclassing ``nn.LayerNorm`` keeps optimiser rules
    such as "no weight decay on norms" working by ``isinstance``. Inside the
    backbone, where data are channels-last, a plain ``nn.LayerNorm`` plays
    this role; this class serves NCHW consumers.
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
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
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


__all__ = ['ConvNHWC', 'LayerNorm2d', 'DropPath', 'drop_path']
