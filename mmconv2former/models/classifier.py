"""The release's classification head, as an mmpretrain neck.

The authors' classifier ends with ``head`` (1x1 conv to 1280 channels, GELU,
channel LayerNorm), global average pooling and ``pred`` (Linear). Here the
first part is :class:`Conv2FormerNeck` and ``pred`` is mmpretrain's own
``LinearClsHead(in_channels=1280)``, so a classifier config reads::

    model = dict(
        type='ImageClassifier',
        backbone=dict(type='Conv2Former', arch='t', out_indices=(3, ), out_norm=False),
        neck=dict(type='Conv2FormerNeck', in_channels=576),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=1280))

and keeps everything mmpretrain offers for heads (losses, top-k, mixup
targets, ``ImageClassificationInferencer``). The neck needs only torch and
mmengine; it reaches mmpretrain's registry through mmengine's root registry.

:func:`release_to_mm` renames a release state dict to these modules' keys.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule

from ..registry import register_model
from .layers import ConvNHWC

# Release key prefix -> mm key prefix for the parts outside the backbone.
# (``head.1`` is the GELU and has no parameters.)
RELEASE_HEAD_KEYS: Dict[str, str] = OrderedDict([
    ('head.0.', 'neck.proj.'),
    ('head.2.', 'neck.norm.'),
    ('pred.', 'head.fc.'),
])


class Conv2FormerNeck(BaseModule):
    """``head`` of the release and its pooling: 1x1 conv, GELU, LN, mean.

    Unlike ConvNeXt, which pools first and normalises the pooled vector,
    Conv2Former widens every position of the last feature map to 1280
    channels and normalises it *before* averaging, so the head sees a
    per-location non-linearity. The 1x1 convolution runs as a matrix product
    on channels-last data (:class:`ConvNHWC`) and the norm is the fused
    ``F.layer_norm`` (the release's hand-written one overflows under fp16);
    parameter shapes equal the release's ``head.0`` / ``head.2``.

    Args:
        in_channels: channels of the last backbone stage (N 512, T/S 576,
            B 768, L 1024).
        out_channels: width of the pre-logits features. Defaults to 1280.
        init_cfg: initialisation config. Defaults to None: the release's
            truncated normal (std 0.02, zero bias) for the convolution.

    Inputs are a tuple of ``(B, C, H, W)`` maps (only the last is used) or a
    single tensor; the output is a one-element tuple of ``(B, out_channels)``.
    """

    def __init__(self, in_channels: int, out_channels: int = 1280,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if init_cfg is None:
            init_cfg = dict(type='TruncNormal', layer='Conv2d', std=0.02, bias=0.0)
        super().__init__(init_cfg=init_cfg)
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f'in_channels and out_channels must be positive, '
                             f'got {in_channels} and {out_channels}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.proj = ConvNHWC(in_channels, out_channels, 1)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor]:
        x = inputs[-1] if isinstance(inputs, (tuple, list)) else inputs
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'Conv2FormerNeck(in_channels={self.in_channels}) expects '
                             f'(B, {self.in_channels}, H, W), got {tuple(x.shape)}; '
                             'set neck.in_channels to the last stage width of the backbone')
        x = self.norm(self.act(self.proj(x.permute(0, 2, 3, 1))))
        return (x.mean((1, 2)),)


def release_to_mm(state_dict: Dict[str, torch.Tensor], task: str = 'cls'
                  ) -> Tuple['OrderedDict[str, torch.Tensor]', List[str]]:
    """Rename a release state dict to mm keys.

    Args:
        state_dict: the release's weights without prefix (what
            :func:`mmconv2former.checkpoint.extract_state_dict` returns).
        task: ``'cls'`` keeps the classifier (``neck.*``, ``head.fc.*``);
            ``'det'`` and ``'seg'`` keep only the backbone.

    Returns:
        ``(converted, dropped)``: every backbone key gets a ``backbone.``
        prefix; ``dropped`` lists the release keys left out.
    """
    if task not in ('cls', 'det', 'seg'):
        raise ValueError(f"task must be 'cls', 'det' or 'seg', got {task!r}")
    converted: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    dropped: List[str] = []
    for key, value in state_dict.items():
        release_prefix = next((p for p in RELEASE_HEAD_KEYS if key.startswith(p)), None)
        if release_prefix is None:
            converted['backbone.' + key] = value
        elif task == 'cls':
            converted[RELEASE_HEAD_KEYS[release_prefix] + key[len(release_prefix):]] = value
        else:
            dropped.append(key)
    return converted, dropped


register_model(Conv2FormerNeck)

__all__ = ['Conv2FormerNeck', 'RELEASE_HEAD_KEYS', 'release_to_mm']
