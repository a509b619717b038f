"""Conv2Former backbone (Hou et al., "Conv2Former: A Simple Transformer-Style
ConvNet for Visual Recognition", TPAMI 2024), for mmdet, mmseg and mmpretrain.

Parameter names and shapes follow the authors' release, so their ImageNet
checkpoints load without renaming. The computation is the release's, laid out
channels-last (see :mod:`mmconv2former.models.layers` for why). This file is
the block's only definition: every submodule is called as a module, in every
mode (training, recomputation, inference, tracing, export), and no state is
derived from the weights. Training memory is saved by PyTorch's own selective
activation checkpointing (:func:`run_blocks`), whose gradients are autograd's.
Folding weights for inference is an explicit, one-way step
(:meth:`Conv2Former.switch_to_deploy`, in :mod:`mmconv2former.models.reparam`).
"""
import copy
import functools
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from ..checkpoint import (arch_name, check_shapes, extract_state_dict, infer_arch,
                          safe_load, split_keys)
from ..ops.depthwise_conv import AVAILABLE as TRITON_AVAILABLE
from ..ops.depthwise_conv import DEPTHWISE_OP
from ..registry import register_model
from .layers import ConvNHWC, DropPath


class ConvModulation(nn.Module):
    """Convolutional modulation: ``proj(DWConv_k(GELU(W_a y)) * W_v y)``, ``y = LN(x)``.

    The large-kernel depthwise output plays the role of attention weights: it
    modulates the value branch elementwise, in place of softmax(QK^T)V.
    Channels-last in and out; submodule names are the release's.
    """

    def __init__(self, dim: int, kernel_size: int, depthwise_impl: str = 'torch') -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.att = nn.Sequential(
            ConvNHWC(dim, dim, 1),
            nn.GELU(),
            ConvNHWC(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim,
                     depthwise_impl=depthwise_impl),
        )
        self.v = ConvNHWC(dim, dim, 1)
        self.proj = ConvNHWC(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.proj(self.att(y) * self.v(y))


class ConvMLP(nn.Module):
    """LN -> 1x1 (expand) -> GELU -> ``h + GELU(DW3x3(h))`` -> 1x1.

    The 3x3 depthwise residual inside the MLP gives the block positional
    information (the release calls it ``pos``). Channels-last in and out.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, depthwise_impl: str = 'torch') -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = ConvNHWC(dim, hidden, 1)
        self.pos = ConvNHWC(hidden, hidden, 3, padding=1, groups=hidden, depthwise_impl=depthwise_impl)
        self.fc2 = ConvNHWC(hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.norm(x)))
        return self.fc2(h + self.act(self.pos(h)))


class Conv2FormerBlock(nn.Module):
    """``x + ls1 * ConvMod(x)``, then ``x + ls2 * MLP(x)``, with stochastic depth.

    Layer scales start at 1e-6 (as in the release and ConvNeXt) so that every
    block starts close to identity, which keeps deep stages (up to 48 blocks)
    trainable without warm-up tricks. They are stored as ``(C,)`` and broadcast
    over channels-last data without reshapes. ``layer_scale_init_value=None``
    builds the block without them (as timm's ConvNeXt allows);
    :func:`~mmconv2former.models.reparam.switch_to_deploy` uses that form once
    it has folded them into ``proj`` and ``fc2``.
    """

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: int = 4,
                 drop_path: float = 0.0, layer_scale_init_value: Optional[float] = 1e-6,
                 depthwise_impl: str = 'torch') -> None:
        super().__init__()
        self.attn = ConvModulation(dim, kernel_size, depthwise_impl)
        self.mlp = ConvMLP(dim, mlp_ratio, depthwise_impl)
        for name in ('layer_scale_1', 'layer_scale_2'):
            self.register_parameter(name, None if layer_scale_init_value is None else
                                    nn.Parameter(torch.full((dim,), layer_scale_init_value)))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(_scaled(self.attn(x), self.layer_scale_1))
        return x + self.drop_path(_scaled(self.mlp(x), self.layer_scale_2))


def _scaled(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return x if scale is None else scale * x


# ---------------------------------------------------------------------------- training memory
def _keep_outputs(modulation_products: bool, ctx, op, *args, **kwargs) -> 'cp.CheckpointPolicy':
    """What a block stores for its backward pass under selective recomputation.

    ``recompute=True`` (``modulation_products``): the outputs of the matrix
    products (the 1x1 convolutions) and of convolutions with kernels larger
    than 3x3 (the large-kernel depthwise one, PyTorch's or the Triton
    operator, whose recomputation would cost as much as a matrix product).
    Everything else, memory-bound and cheap to redo (LayerNorms, GELUs, the
    modulation product, the MLP's 3x3 depthwise convolution on its 4C-wide
    tensor), is recomputed in the backward pass.

    ``recompute='modulation'``: the modulation's three C->C products
    (``att.0``, ``v``, ``proj``) are recomputed too; of the products only the
    MLP's expansion and contraction (C <-> 4C, four times the work each) are
    stored. The products are told apart by their weight's shape: the weight
    is the last argument of ``mm``/``addmm``, and a square one is the
    modulation's (with ``mlp_ratio=1`` the MLP's are square too, and are
    recomputed as well)."""
    aten = torch.ops.aten
    if op in (aten.mm.default, aten.addmm.default):
        weight = args[-1]
        if modulation_products or weight.shape[0] != weight.shape[1]:
            return cp.CheckpointPolicy.MUST_SAVE
        return cp.CheckpointPolicy.PREFER_RECOMPUTE
    if (op is aten.convolution.default or op is DEPTHWISE_OP) and args[1].shape[-1] > 3:
        return cp.CheckpointPolicy.MUST_SAVE
    return cp.CheckpointPolicy.PREFER_RECOMPUTE


_noted_missing_selective = False


def _selective_context(recompute: Union[bool, str]):
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` with
    :func:`_keep_outputs` for this ``recompute`` mode, or None where this
    torch lacks selective checkpointing (< 2.4): blocks then store
    everything, with a note logged once. (Not an ``lru_cache``:
    ``torch.compile`` traces through this call.)"""
    global _noted_missing_selective
    if not hasattr(cp, 'create_selective_checkpoint_contexts'):
        if not _noted_missing_selective:
            _noted_missing_selective = True
            print_log('Conv2Former: this torch has no selective activation checkpointing '
                      f'(torch >= 2.4); recompute={recompute!r} falls back to storing all activations',
                      logger='current', level=30)
        return None
    policy = functools.partial(_keep_outputs, recompute is True)
    return functools.partial(cp.create_selective_checkpoint_contexts, policy)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, with_cp: bool, recompute: Union[bool, str]
               ) -> torch.Tensor:
    """Run one stage's blocks for training (grad enabled): the one place that
    chooses what the blocks store. Both forms are PyTorch's non-reentrant
    checkpointing, so hooks, autocast, ``torch.compile`` and DDP see the
    blocks' own forward, and gradients are autograd's."""
    if with_cp:  # only block inputs are stored
        for block in blocks:
            x = cp.checkpoint(block, x, use_reentrant=False)
        return x
    context = _selective_context(recompute) if recompute else None
    if context is None:
        return blocks(x)
    for block in blocks:
        x = cp.checkpoint(block, x, use_reentrant=False, context_fn=context)
    return x


def _stem(in_channels: int, channels: int) -> nn.Sequential:
    """Stride-4 stem: conv3x3 s2 -> GELU -> BN -> conv3x3 -> GELU -> BN -> conv2x2 s2.

    BatchNorm sits *after* GELU, as in the release: it re-centres the
    rectified activations before the next convolution. Convolutions have no
    bias because BatchNorm (or the next layer's norm) absorbs it. Indices 0..6
    match the release's ``downsample_layers.0.{0,2,3,5,6}`` names.
    """
    mid = channels // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False),
        nn.GELU(),
        nn.BatchNorm2d(mid),
        nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False),
        nn.GELU(),
        nn.BatchNorm2d(mid),
        nn.Conv2d(mid, channels, 2, stride=2, bias=False),
    )


class Conv2Former(BaseModule):
    """Conv2Former backbone with multi-scale outputs (strides 4, 8, 16, 32).

    Args:
        arch: a name from :attr:`arch_settings` (``'n'``, ``'t'``, ``'s'``,
            ``'b'``, ``'b_22k'``, ``'l'``) or a dict with ``channels``,
            ``depths``, ``kernel_size`` and optionally ``mlp_ratio``.
            Defaults to ``'t'``.
        in_channels: input image channels. Defaults to 3.
        out_indices: stages whose outputs are returned; negative indices count
            from the end; outputs come in stage order. Defaults to ``(0, 1, 2, 3)``.
        out_norm: apply a LayerNorm to each returned feature map, as dense
            prediction backbones (ConvNeXt, Swin) do. These norms are not in
            the release's checkpoints and start at identity. Defaults to True.
        drop_path_rate: stochastic depth rate of the last block; it grows
            linearly from 0 over all blocks. Defaults to 0.
        layer_scale_init_value: initial layer scale; None builds blocks
            without layer scales. Defaults to 1e-6.
        frozen_stages: freeze the stem and the first ``frozen_stages`` stages
            (with their downsampling layers and output norms); 0 freezes
            nothing, -1 likewise. Defaults to 0.
        norm_eval: keep the stem's BatchNorm layers in eval mode while
            training (for small-batch detection). Defaults to False.
        with_cp: full activation checkpointing of each block while training:
            only block inputs are stored and every block runs its forward a
            second time in the backward pass (non-reentrant, DDP-safe). For
            the largest inputs: measured as for ``recompute`` below, 0.22x the
            activation memory of ``recompute=False``. Defaults to False.
        recompute: selective recomputation while training (when ``with_cp``
            is off), by PyTorch's selective activation checkpointing. Same
            gradients in every mode (autograd's, so forward hooks that
            replace outputs are differentiated too).

            * True: each block stores only the outputs of its matrix
              products and of the large-kernel depthwise convolution, and
              recomputes the cheap rest (norms, GELUs, the modulation
              product, the MLP's 3x3 depthwise convolution) in the backward
              pass. Measured: Conv2Former-T, batch 1 at 1024², training
              step on CPU, peak activation memory 0.43x that of
              ``recompute=False``.
            * ``'modulation'``: the modulation's three C->C products
              (``att.0``, ``v``, ``proj``) are recomputed as well; of the
              products only the MLP's two (C <-> 4C) are stored. Measured:
              Conv2Former-T, bf16 training step, batch 8 at 224², on CPU,
              peak memory 0.82x that of ``recompute=True`` (0.69x
              ConvNeXt-T's, against 0.84x; at batch 1 at 1024², 0.69x
              against 0.85x), for about 9% more matrix-product work.
            * False: every activation is stored.

            ``docs/performance.md`` has the measurements. PyTorch's
            selective checkpointing allows one backward pass through a
            block: for double backward (gradient penalties), use False or
            ``with_cp=True``. Defaults to True.
        depthwise_impl: who computes the blocks' depthwise convolutions:
            ``'torch'`` (``F.conv2d``: cuDNN on a GPU, oneDNN on a CPU) or
            ``'triton'`` (the Triton kernels of
            :mod:`mmconv2former.ops.depthwise_conv` on CUDA tensors, PyTorch
            elsewhere), a candidate for the GPU whose measurement is in
            ``docs/gpu_benchmark.md``. The weights and the numbers are the
            same up to fp32 summation order. Defaults to ``'torch'``.
        pretrained: deprecated; use ``init_cfg=dict(type='Pretrained',
            checkpoint=...)``. Defaults to None.
        init_cfg: initialisation config. ``dict(type='Pretrained',
            checkpoint=PATH, use_ema=False, prefix=None)`` loads a release
            file (or an mm checkpoint with ``prefix='backbone.'``) safely.
            Defaults to None (the release's truncated-normal init).

    Attributes:
        out_channels: channels of each returned feature map.
        out_strides: stride of each returned feature map w.r.t. the input.
    """

    arch_settings: Dict[str, dict] = {
        'n': dict(channels=[64, 128, 256, 512], depths=[2, 2, 8, 2], kernel_size=7),
        't': dict(channels=[72, 144, 288, 576], depths=[3, 3, 12, 3], kernel_size=11),
        's': dict(channels=[72, 144, 288, 576], depths=[4, 4, 32, 4], kernel_size=11),
        'b': dict(channels=[96, 192, 384, 768], depths=[4, 4, 34, 4], kernel_size=11),
        'b_22k': dict(channels=[96, 192, 384, 768], depths=[4, 4, 34, 4], kernel_size=7),
        'l': dict(channels=[128, 256, 512, 1024], depths=[4, 4, 48, 4], kernel_size=11),
    }
    strides: Tuple[int, ...] = (4, 8, 16, 32)

    def __init__(self,
                 arch: Union[str, dict] = 't',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_norm: bool = True,
                 drop_path_rate: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6,
                 frozen_stages: int = 0,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 recompute: Union[bool, str] = True,
                 depthwise_impl: str = 'torch',
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either `pretrained` or `init_cfg`, not both; '
                                 '`pretrained` is deprecated')
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a str path or None, got {type(pretrained).__name__}')
            warnings.warn('Conv2Former: `pretrained` is deprecated, use '
                          'init_cfg=dict(type="Pretrained", checkpoint=...)', DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)

        settings = self.parse_arch(arch)
        self.arch = settings
        self.channels: List[int] = list(settings['channels'])
        self.depths: List[int] = list(settings['depths'])
        self.kernel_size: int = settings['kernel_size']
        self.mlp_ratio: int = settings['mlp_ratio']
        self.num_stages = len(self.depths)

        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f'in_channels must be a positive int, got {in_channels!r}')
        self.in_channels = in_channels
        self.out_indices = self._normalise_out_indices(out_indices, self.num_stages)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        if recompute == 'selective':
            raise ValueError("recompute='selective' is what recompute=True now does on every "
                             'device (PyTorch\'s selective checkpointing); pass recompute=True')
        if not (isinstance(recompute, bool) or recompute == 'modulation'):
            raise ValueError(f"recompute must be True, False or 'modulation', got {recompute!r}")
        self.recompute = recompute
        # Its values are checked by ConvNHWC, which every block passes it to.
        if depthwise_impl == 'triton' and not TRITON_AVAILABLE:
            print_log("Conv2Former: depthwise_impl='triton' needs Triton and torch >= 2.4; "
                      "PyTorch's convolution serves instead", logger='current', level=30)
        self.depthwise_impl = depthwise_impl
        self.deployed = False

        # Stem (index 0) and the three stride-2 patch mergings. Between stages:
        # channel LayerNorm then conv2x2 s2, on channels-last data.
        self.downsample_layers = nn.ModuleList([_stem(in_channels, self.channels[0])])
        for i in range(1, self.num_stages):
            self.downsample_layers.append(nn.Sequential(
                nn.LayerNorm(self.channels[i - 1], eps=1e-6),
                ConvNHWC(self.channels[i - 1], self.channels[i], 2, stride=2),
            ))

        # Stochastic depth grows linearly over *all* blocks, as in the release.
        rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.stages = nn.ModuleList()
        first = 0
        for dim, depth in zip(self.channels, self.depths):
            self.stages.append(nn.Sequential(*[
                Conv2FormerBlock(dim, self.kernel_size, self.mlp_ratio, rates[first + j],
                                 layer_scale_init_value, depthwise_impl) for j in range(depth)]))
            first += depth

        # One entry per stage so that names stay ``out_norms.{stage}``.
        self.out_norms = nn.ModuleList([
            nn.LayerNorm(dim, eps=1e-6) if out_norm and i in self.out_indices else nn.Identity()
            for i, dim in enumerate(self.channels)])
        self.out_channels: Tuple[int, ...] = tuple(self.channels[i] for i in self.out_indices)
        self.out_strides: Tuple[int, ...] = tuple(self.strides[i] for i in self.out_indices)

        self._freeze_stages()

    # ------------------------------------------------------------------ config
    @classmethod
    def parse_arch(cls, arch: Union[str, dict]) -> dict:
        """Return a checked copy of the settings for ``arch`` (name or dict)."""
        if isinstance(arch, str):
            key = arch.lower().replace('-', '_')
            if key not in cls.arch_settings:
                raise KeyError(f'unknown Conv2Former arch {arch!r}; choose one of '
                               f'{sorted(cls.arch_settings)} or pass a dict with '
                               "'channels', 'depths', 'kernel_size'")
            settings = copy.deepcopy(cls.arch_settings[key])
        elif isinstance(arch, dict):
            required = {'channels', 'depths', 'kernel_size'}
            missing = required - set(arch)
            extra = set(arch) - required - {'mlp_ratio'}
            if missing or extra:
                raise ValueError(f'arch dict must have keys {sorted(required)} (and optionally '
                                 f"'mlp_ratio'); missing {sorted(missing)}, unknown {sorted(extra)}")
            settings = copy.deepcopy(dict(arch))
            if len(settings['channels']) != len(settings['depths']) or not settings['depths']:
                raise ValueError('arch: channels and depths must be non-empty and of equal length, '
                                 f"got {len(settings['channels'])} and {len(settings['depths'])}")
            if len(settings['depths']) != len(cls.strides):
                raise ValueError(f'arch: Conv2Former has {len(cls.strides)} stages, '
                                 f"got {len(settings['depths'])}")
            if any(c <= 0 or c % 2 for c in settings['channels']) or any(d <= 0 for d in settings['depths']):
                raise ValueError('arch: channels must be positive and even (the stem halves the '
                                 'first), depths positive')
            k = settings['kernel_size']
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f'arch: kernel_size must be a positive odd int, got {k!r}')
        else:
            raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')
        settings.setdefault('mlp_ratio', 4)
        return settings

    @staticmethod
    def _normalise_out_indices(out_indices: Union[int, Sequence[int]], num_stages: int) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        if not isinstance(out_indices, (list, tuple)) or not out_indices:
            raise ValueError(f'out_indices must be a non-empty int sequence, got {out_indices!r}')
        result = []
        for index in out_indices:  # a new tuple: the caller's list is never modified
            real = index + num_stages if index < 0 else index
            if not 0 <= real < num_stages:
                raise ValueError(f'out_indices entry {index} is out of range for {num_stages} stages')
            result.append(real)
        if len(set(result)) != len(result):
            raise ValueError(f'out_indices has duplicates: {out_indices!r}')
        # Outputs come in stage order (what FPN-style necks expect).
        return tuple(sorted(result))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'Conv2Former expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}. '
                'Convert grey/RGBA images to RGB in the data pipeline, or set in_channels.')
        if x.shape[-2] < self.strides[-1] or x.shape[-1] < self.strides[-1]:
            raise ValueError(
                f'input {tuple(x.shape[-2:])} is smaller than the total stride {self.strides[-1]}; '
                f'resize or pad images to at least {self.strides[-1]}x{self.strides[-1]}')
        # A channels-last input lets oneDNN/cuDNN run the stem without layout
        # reorders, and its output then permutes to a contiguous NHWC tensor.
        x = self.downsample_layers[0](x.contiguous(memory_format=torch.channels_last))
        # Under autocast the convolutions return bf16/fp16. The residual stream
        # stays in the weights' dtype (fp32): in the trained form the layer
        # scales' promotion does that from each stage's first block; casting
        # here keeps the numbers the same, and keeps the folded model (no
        # layer scales, models/reparam.py) as precise as the trained one.
        residual_dtype = self.downsample_layers[0][0].weight.dtype
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        outs = []
        for i in range(self.num_stages):
            if i > 0:
                x = self.downsample_layers[i](x)
            x = x.to(residual_dtype)
            x = self._run_stage(self.stages[i], x)
            if i in self.out_indices:
                outs.append(self.out_norms[i](x).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return stage(x)
        return run_blocks(stage, x, self.with_cp, self.recompute)

    # ------------------------------------------------------------------ training state
    def _freeze_stages(self) -> None:
        for i in range(max(self.frozen_stages, 0)):
            for module in (self.downsample_layers[i], self.stages[i], self.out_norms[i]):
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> 'Conv2Former':
        if mode and self.deployed:
            raise RuntimeError('this Conv2Former was switched to deploy mode (weights folded for '
                               'inference) and cannot be trained; build a new model and load the '
                               'original checkpoint to train')
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def switch_to_deploy(self) -> 'Conv2Former':
        """Fold weights, once and for good, for inference.

        Layer scales are folded into ``proj`` / ``fc2`` and the stem's second
        BatchNorm into the patch convolution (see
        :mod:`mmconv2former.models.reparam`); the modules and their forward
        stay the same. Outputs are unchanged up to float rounding; the state
        dict no longer matches the release's, and the model refuses
        ``train()`` afterwards. Call it after loading the weights and before
        inference or export. Returns ``self``.
        """
        from .reparam import switch_to_deploy
        return switch_to_deploy(self)

    # ------------------------------------------------------------------ layer-wise lr decay
    @property
    def num_layer_groups(self) -> int:
        """Layer ids used by :meth:`get_layer_depth` in layer-wise mode."""
        # stem 0, stage 0 -> 1, stage 1 -> 2, stage 2 in groups of 3 blocks,
        # stage 3 -> last. With 9 or 27 blocks in stage 2 this equals
        # ConvNeXt's 6 and 12; S/B/L (32-48 blocks) get 14/15/19.
        return 4 + (self.depths[2] - 1) // 3 if self.num_stages == 4 else self.num_stages

    def get_layer_depth(self, param_name: str, prefix: str = '',
                        stage_wise: bool = False) -> Tuple[int, int]:
        """Layer id of a parameter for layer-wise learning-rate decay.

        Args:
            param_name: full parameter name, e.g. ``'backbone.stages.2.7.mlp.fc1.weight'``.
            prefix: the backbone's prefix in ``param_name`` (``'backbone.'``).
                Parameters outside it (necks, heads) get the last id.
            stage_wise: one id per stage instead of groups of blocks.

        Returns:
            ``(layer_id, num_layers)``: the learning rate is scaled by
            ``decay_rate ** (num_layers - 1 - layer_id)``.
        """
        max_id = (self.num_stages + 1) if stage_wise else self.num_layer_groups
        if not param_name.startswith(prefix):
            return max_id + 1, max_id + 2
        name = param_name[len(prefix):]
        parts = name.split('.')
        if parts[0] == 'downsample_layers':
            stage = int(parts[1])
            layer_id = 0 if stage == 0 else self._block_layer_id(stage, 0, stage_wise, max_id)
        elif parts[0] == 'stages':
            layer_id = self._block_layer_id(int(parts[1]), int(parts[2]), stage_wise, max_id)
        else:  # output norms belong with the neck
            layer_id = max_id + 1
        return layer_id, max_id + 2

    def _block_layer_id(self, stage: int, block: int, stage_wise: bool, max_id: int) -> int:
        if stage_wise:
            return stage + 1
        if stage == self.num_stages - 1:
            return max_id
        if stage == 2:
            return 3 + block // 3
        return stage + 1

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """The release's init, then (if configured) its pretrained weights."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self.load_release_weights(cfg['checkpoint'], use_ema=cfg.get('use_ema', False),
                                      prefix=cfg.get('prefix'))
        elif cfg is not None:
            super().init_weights()
        self._is_init = True

    def load_release_weights(self, path: str, use_ema: bool = False,
                             prefix: Optional[str] = None) -> Tuple[List[str], List[str]]:
        """Load backbone weights from a release file or an mm checkpoint.

        Only allow-listed objects are unpickled; classifier keys (``head.*``,
        ``pred.*``) are ignored; any shape mismatch raises with both shapes
        and the variant the checkpoint was made for.

        Returns:
            ``(missing, unexpected)`` keys; missing ones keep their init.
        """
        state = extract_state_dict(safe_load(path), use_ema=use_ema, prefix=prefix)
        own = self.state_dict()
        hint = ''
        if any(k.startswith('stages.') for k in state):
            try:
                ckpt_arch = infer_arch(state)
                name = arch_name(ckpt_arch, self.arch_settings)
                hint = (f'The checkpoint looks like arch={name!r}' if name else
                        f'The checkpoint has channels={ckpt_arch["channels"]}, '
                        f'depths={ckpt_arch["depths"]}, kernel_size={ckpt_arch["kernel_size"]}')
                hint += (f"; this model has channels={self.channels}, depths={self.depths}, "
                         f'kernel_size={self.kernel_size}. Build the matching arch.')
            except ValueError:
                pass
        check_shapes(own, state, hint)
        missing, unexpected = split_keys(own, state, ignore_prefixes=('head.', 'pred.'))
        if any(k.startswith('stages.') for k in unexpected):
            raise ValueError(f'checkpoint {path!r} has blocks this model lacks '
                             f'(e.g. {unexpected[0]}). {hint}'.rstrip())
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        print_log(f'Conv2Former: loaded {path} ({"EMA" if use_ema else "plain"} weights); '
                  f'missing keys: {missing or "none"}; unexpected keys: {unexpected or "none"}',
                  logger='current')
        return missing, unexpected


register_model(Conv2Former)
