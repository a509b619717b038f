"""A plain, release-style Conv2Former used as the tests' numerical reference.

Written from the paper's and release's description, not for use in training:
NCHW everywhere, ``nn.Conv2d`` for every layer and the hand-written channel
LayerNorm (mean / variance / sqrt) that the authors' code uses. Its parameter
names equal the release's, classifier included, so a release state dict loads
into it with ``strict=True``. Tests compare our backbone and classifier with it.
"""
from typing import Sequence

import torch
import torch.nn as nn


class ReferenceChannelNorm(nn.Module):
    """The release's channels-first LayerNorm, computed by hand."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _Attn(nn.Module):
    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.norm = ReferenceChannelNorm(dim)
        self.att = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(),
                                 nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim))
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.proj(self.att(x) * self.v(x))


class _MLP(nn.Module):
    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.norm = ReferenceChannelNorm(dim)
        self.fc1 = nn.Conv2d(dim, dim * ratio, 1)
        self.pos = nn.Conv2d(dim * ratio, dim * ratio, 3, padding=1, groups=dim * ratio)
        self.fc2 = nn.Conv2d(dim * ratio, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.norm(x)))
        x = x + self.act(self.pos(x))
        return self.fc2(x)


class _Block(nn.Module):
    def __init__(self, dim: int, kernel_size: int, ratio: int) -> None:
        super().__init__()
        self.attn = _Attn(dim, kernel_size)
        self.mlp = _MLP(dim, ratio)
        self.layer_scale_1 = nn.Parameter(1e-6 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1[:, None, None] * self.attn(x)
        return x + self.layer_scale_2[:, None, None] * self.mlp(x)


class ReferenceConv2Former(nn.Module):
    """Release-style network (inference only, no stochastic depth).

    ``forward_stages`` returns the four stage outputs; ``forward`` the logits
    of the release's head (conv1x1 -> 1280, GELU, LN, average pool, Linear).
    """

    def __init__(self, channels: Sequence[int], depths: Sequence[int], kernel_size: int,
                 mlp_ratio: int = 4, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        c0 = channels[0]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_channels, c0 // 2, 3, 2, 1, bias=False), nn.GELU(), nn.BatchNorm2d(c0 // 2),
            nn.Conv2d(c0 // 2, c0 // 2, 3, 1, 1, bias=False), nn.GELU(), nn.BatchNorm2d(c0 // 2),
            nn.Conv2d(c0 // 2, c0, 2, 2, bias=False))])
        for i in range(1, len(channels)):
            self.downsample_layers.append(nn.Sequential(
                ReferenceChannelNorm(channels[i - 1]), nn.Conv2d(channels[i - 1], channels[i], 2, 2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[_Block(c, kernel_size, mlp_ratio) for _ in range(d)])
            for c, d in zip(channels, depths))
        self.head = nn.Sequential(nn.Conv2d(channels[-1], 1280, 1), nn.GELU(), ReferenceChannelNorm(1280))
        self.pred = nn.Linear(1280, num_classes)

    def forward_stages(self, x: torch.Tensor) -> list:
        outs = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stages(x)[-1]
        return self.pred(self.head(x).mean((-2, -1)))
