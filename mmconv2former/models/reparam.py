"""Conv2Former's inference form: an explicit, one-way folding of weights.

:func:`switch_to_deploy` (or ``Conv2Former.switch_to_deploy()``) rewrites a
trained backbone's weights once, as mmpretrain's RepVGG/MobileOne
``switch_to_deploy`` and timm's ``reparameterize_model`` do:

* each block's layer scales are multiplied into the output rows of ``proj``
  and ``fc2`` (``ls * (W h + b) = (ls W) h + ls b``), and the block is left
  without layer scales, which saves two elementwise passes per block;
* the stem's second BatchNorm is folded into the 2x2 patch convolution that
  follows it, which becomes a convolution with bias.

The modules stay the package's own (:class:`Conv2FormerBlock` and the stem's
``nn.Sequential``), so the block's maths has one definition, and forward hooks,
tracing, FLOP counters, ONNX export and ``torch.compile`` see what they see in
the trained model. Nothing is cached behind the user's back: the deployed model
owns its folded weights, which no longer match the release's names, and it
refuses ``train()``.
"""
import torch
import torch.nn as nn


def _scale_rows(conv: nn.Conv2d, scale: torch.Tensor) -> None:
    """``conv`` then a per-output-channel ``scale``, as one convolution."""
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    if conv.bias is not None:
        conv.bias.mul_(scale)


@torch.no_grad()
def fold_layer_scales(block: nn.Module) -> None:
    """Fold a :class:`Conv2FormerBlock`'s layer scales into ``proj``/``fc2``."""
    for scale_name, conv in (('layer_scale_1', block.attn.proj), ('layer_scale_2', block.mlp.fc2)):
        scale = getattr(block, scale_name)
        if scale is not None:
            _scale_rows(conv, scale.detach())
            block.register_parameter(scale_name, None)


@torch.no_grad()
def fold_bn_into_next_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
    """Make ``conv`` compute ``conv(bn(x))``, in place (the module, its hooks
    and its weight's memory layout stay); ``bn`` is then to be dropped.

    ``conv(s * y + t) = conv_{W * s}(y) + sum(W * t)`` holds only where no
    zero padding enters the sum, which is why the stem's *first* BatchNorm,
    feeding a padded 3x3 convolution, stays as it is."""
    unpadded = conv.padding == 'valid' or all(p == 0 for p in conv.padding)
    if not unpadded or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != 'zeros':
        raise ValueError('only an unpadded, ungrouped, undilated convolution can absorb the '
                         'BatchNorm before it')
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    bias = (conv.weight * shift.view(1, -1, 1, 1)).sum((1, 2, 3))
    if conv.bias is not None:
        conv.bias.add_(bias)
    else:
        conv.bias = nn.Parameter(bias)
    conv.weight.mul_(scale.view(1, -1, 1, 1))


@torch.no_grad()
def switch_to_deploy(model: nn.Module) -> nn.Module:
    """Fold a :class:`Conv2Former`'s weights in place for inference (see the
    module docstring); a second call is a no-op. Returns the model."""
    if model.deployed:
        return model
    model.eval()
    stem = model.downsample_layers[0]
    fold_bn_into_next_conv(stem[5], stem[6])
    stem[5] = nn.Identity()
    for stage in model.stages:
        for block in stage:
            fold_layer_scales(block)
    model.requires_grad_(False)
    model.deployed = True
    return model


__all__ = ['fold_bn_into_next_conv', 'fold_layer_scales', 'switch_to_deploy']
