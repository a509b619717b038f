"""Conv2Former's fast inference form: an explicit, one-way rewrite.

:func:`switch_to_deploy` (or ``Conv2Former.switch_to_deploy()``) replaces the
stem and each stage of a trained backbone by inference-only modules that hold
weights folded *once*, as mmpretrain's RepVGG/MobileOne ``switch_to_deploy``
and timm's ``reparameterize_model`` do. Nothing is cached behind the user's
back, so nothing can go stale: the deployed model owns its folded weights and
refuses ``train()``. Every CPU speed-up of the package lives in this file:

* ``att.0`` and ``v`` read the same normalised input: their weights are
  stacked into one ``[2C, C]`` matrix product that reads it once;
* layer scales are folded into ``proj`` and ``fc2``, and the residual sum is
  the matrix product's accumulation (``addmm``, beta = 1): one pass over the
  output instead of four (bias, product, scale, add);
* the stem's second BatchNorm is folded into the 2x2 patch convolution;
* in eager fp32 CPU inference (and only there): activations are updated in
  place, each stage's residual stream is accumulated into one buffer, images
  are processed in cache-sized groups (the stem and the blocks never mix
  images), and oneDNN's fused kernels apply the bias and GELU while a product
  is still in registers. Those kernels are private PyTorch operators: they are
  looked up when first needed, and where they are missing (or
  :data:`USE_ONEDNN` is False) public ops do the same work.

Anything that records rather than runs the ops (``torch.jit.trace``, ONNX
export, ``torch.compile``, FLOP counters), autograd, autocast and other
devices get the folded weights through plain public ops. Measured speed-ups
are in ``docs/performance.md`` (``tools/analysis/benchmark.py --deploy``).
"""
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .native import autocast_enabled, tracing

#: Use oneDNN's fused "product + bias/GELU" kernels where they exist.
USE_ONEDNN: bool = True
#: oneDNN's fused "matrix product + GELU" pays only where its GELU is AVX-512
#: code (measured: ~4% of the backbone on an AVX-512 Xeon; 6-7% slower on an
#: AVX2-only AMD EPYC than the product followed by an in-place GELU).
FUSE_LINEAR_GELU: bool = torch.backends.cpu.get_cpu_capability().startswith('AVX512')
#: Pixels per group of images in CPU inference (at least one image per group):
#: a group's activations stay in cache instead of streaming e.g. a 29 MB
#: 4C-wide tensor (T, batch 8, 224) through memory ten times; ~13% faster, flat
#: from 800 to 4096 pixels.
CPU_GROUP_PIXELS: int = 2048


@functools.lru_cache(maxsize=None)
def _private_ops():
    """oneDNN's fused ops and the dispatch-mode probe, or None where this
    torch lacks any of them (then the public path serves)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
        return (torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._convolution_pointwise,
                _get_current_dispatch_mode)
    except (ImportError, AttributeError, RuntimeError):
        return None


def _fast(x: torch.Tensor) -> bool:
    """Eager fp32 CPU inference outside autocast: in-place work and image groups."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not autocast_enabled('cpu') and not tracing())


def _onednn(x: torch.Tensor):
    """The fused oneDNN ops, where they may serve for ``x`` (else None).
    Dispatch modes (FLOP counters, fake tensors) do not know them."""
    ops = _private_ops() if USE_ONEDNN and torch.backends.mkldnn.is_available() else None
    if ops is None or not torch.backends.mkldnn.enabled or ops[2]() is not None:
        return None
    return ops


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``[GELU](x @ weight.T + bias)`` on the fast path."""
    ops = _onednn(x)
    if ops is not None and (FUSE_LINEAR_GELU or not gelu):
        return ops[0](x, weight, bias, *(('gelu', [], 'none') if gelu else ('none', [], '')))
    # MKL's GEMM, then the bias in place: F.linear would first broadcast the
    # bias into the output (one more full write of it).
    out = F.linear(x, weight).add_(bias)
    return torch.ops.aten.gelu_(out) if gelu else out


def _conv_gelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``GELU(conv(x))`` for channels-last ``(B, H, W, C)`` ``x`` on the fast path;
    oneDNN applies the GELU while the output is in registers (the 3x3 conv of
    the 4C-wide MLP is memory-bound: ~25% faster than conv, then GELU)."""
    ops = _onednn(x)
    if ops is None:
        return torch.ops.aten.gelu_(conv(x))
    out = ops[1](x.permute(0, 3, 1, 2), conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                 list(conv.dilation), conv.groups, 'gelu', [], 'none')
    return out.permute(0, 2, 3, 1)


def _residual(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              out: torch.Tensor) -> torch.Tensor:
    """``out = x + h @ weight.T + bias`` as one accumulating product (``out``
    may be ``x``; ``addmm(..., out=)`` rather than ``addmm_`` so that FLOP
    counters, which know ``addmm`` only, see it)."""
    torch.addmm(x.view(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(),
                out=out.view(-1, out.shape[-1]))
    return out.add_(bias)


class DeployBlock(nn.Module):
    """A :class:`Conv2FormerBlock` with ``att.0``/``v`` stacked and layer
    scales folded into ``proj``/``fc2``; inference only."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        attn, mlp = block.attn, block.mlp
        ls1, ls2 = block.layer_scale_1.detach(), block.layer_scale_2.detach()
        self.norm1, self.dw = attn.norm, attn.att[2]
        self.norm2, self.fc1, self.pos = mlp.norm, mlp.fc1, mlp.pos
        self.in_weight = _fold(torch.cat([attn.att[0].weight.flatten(1), attn.v.weight.flatten(1)]))
        self.in_bias = _fold(torch.cat([attn.att[0].bias, attn.v.bias]))
        self.proj_weight = _fold(attn.proj.weight.flatten(1) * ls1[:, None])
        self.proj_bias = _fold(attn.proj.bias * ls1)
        self.fc2_weight = _fold(mlp.fc2.weight.flatten(1) * ls2[:, None])
        self.fc2_bias = _fold(mlp.fc2.bias * ls2)

    def forward(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block; on the fast path its result goes into ``out`` (which
        may be ``x`` itself), elsewhere ``out`` is ignored."""
        if out is None or not _fast(x):
            a, v = F.linear(self.norm1(x), self.in_weight, self.in_bias).chunk(2, dim=-1)
            x = x + F.linear(self.dw(F.gelu(a)) * v, self.proj_weight, self.proj_bias)
            h = F.gelu(self.fc1(self.norm2(x)))
            return x + F.linear(h + F.gelu(self.pos(h)), self.fc2_weight, self.fc2_bias)
        a, v = _linear(self.norm1(x), self.in_weight, self.in_bias).chunk(2, dim=-1)
        # `a` is a strided view: copying it, then GELU in place on dense data,
        # is 2-3x faster than ATen's GELU loop on the view (AVX2, 2 threads).
        m = self.dw(torch.ops.aten.gelu_(a.contiguous())).mul_(v)
        x = _residual(x, m, self.proj_weight, self.proj_bias, out)
        h = _linear(self.norm2(x), self.fc1.weight.flatten(1), self.fc1.bias, gelu=True)
        return _residual(x, _conv_gelu(self.pos, h).add_(h), self.fc2_weight, self.fc2_bias, x)


class DeployStage(nn.Module):
    """A stage of :class:`DeployBlock` s. On the fast path it runs on groups
    of images, each group's residual stream accumulated in place into one
    output buffer (the caller's input is never written)."""

    def __init__(self, stage: nn.Sequential) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DeployBlock(block) for block in stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            for block in self.blocks:
                x = block(x)
            return x
        x = x.contiguous()
        out = torch.empty_like(x)
        step = max(1, CPU_GROUP_PIXELS // (x.shape[1] * x.shape[2]))
        for part, out_part in zip(x.split(step), out.split(step)):
            for i, block in enumerate(self.blocks):
                block(part if i == 0 else out_part, out_part)
        return out


class DeployStem(nn.Module):
    """The stem with its second BatchNorm folded into the patch convolution,
    run on cache-sized groups of images on the fast path."""

    def __init__(self, stem: nn.Sequential) -> None:
        super().__init__()
        bn, conv = stem[5], stem[6]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        # conv(s * y + t) = conv_{W * s}(y) + sum(W * t): exact, since the 2x2
        # stride-2 conv has no padding. The first BatchNorm feeds a zero-padded
        # 3x3 conv: folding its shift would be exact only away from the border.
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          stride=conv.stride, bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight * scale[None, :, None, None])
        fused.bias.copy_((conv.weight * shift[None, :, None, None]).sum((1, 2, 3)))
        if conv.bias is not None:
            fused.bias.add_(conv.bias)
        self.layers = nn.Sequential(*stem[:5], fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return self.layers(x)
        step = max(1, CPU_GROUP_PIXELS // (x.shape[-2] * x.shape[-1]))
        return torch.cat([self.layers(part) for part in x.split(step)])


def _fold(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


@torch.no_grad()
def switch_to_deploy(model: nn.Module) -> nn.Module:
    """Rewrite a :class:`Conv2Former` in place into its deploy form (see the
    module docstring); a second call is a no-op. Returns the model."""
    if model.deployed:
        return model
    model.eval()
    model.downsample_layers[0] = DeployStem(model.downsample_layers[0])
    for i, stage in enumerate(model.stages):
        model.stages[i] = DeployStage(stage)
    model.requires_grad_(False)
    model.deployed = True
    return model
