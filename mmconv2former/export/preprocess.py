"""The data preprocessor's test-time work, as a module that goes into the graph."""
import importlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ExportError


class Preprocess(nn.Module):
    """The data preprocessor's test-time work on a batch of raw pixels:
    channel flip, ``(x - mean) / std``, then padding at the bottom/right up
    to a multiple of ``size_divisor`` and/or to at least ``size``, with
    ``pad_value`` (padding comes after normalisation, as in mmengine, mmdet,
    mmseg and mmpretrain).

    Args:
        flip_channels: reverse the channel order (BGR -> RGB). Defaults to False.
        mean: per-channel mean; None skips normalisation. Defaults to None.
        std: per-channel standard deviation, with ``mean``. Defaults to None.
        size_divisor: pad height and width up to a multiple of it. Defaults to 1.
        size: ``(H, W)`` to pad up to at least. Defaults to None.
        pad_value: value of the padded pixels. Defaults to 0.
    """

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
