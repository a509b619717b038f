"""The package's native kernels for CPU training: the depthwise weight
gradient, and the middle of the MLP's backward pass.

After the matrix products, the largest cost of a Conv2Former training step on
CPU was oneDNN's depthwise *weight gradient*: 4-35x the time of the same
convolution's forward pass for the 11x11 kernels (35x on stage 4's 7x7 maps),
where a direct per-channel correlation costs about what the forward does.
``csrc/depthwise_wgrad.cpp`` computes that gradient (and the bias gradient)
directly; the forward pass and the input gradient stay with PyTorch (oneDNN),
which is fast at both. See ``docs/performance.md`` for the measured
shares, ``tools/analysis/benchmark.py --wgrad-probe`` for the kernel per
stage and ``--mode train --peers native-off`` for its effect on a training step.

``csrc/mlp_backward.cpp`` does, in one sweep, what the recomputing backward
pass of the MLP (``recompute.py``) otherwise does in nine memory-bound
operators on its 4C-wide tensors: ``GELU -> DW3x3 -> GELU -> +`` recomputed from
``fc1``'s output, and the gradients back through them (:func:`mlp_backward`;
``--wgrad-probe`` times it against the operators too).

The kernels are plain C++ with no PyTorch headers: they are compiled at first
use with the system's C++ compiler (a few seconds) into one library, cached
under a key of the sources, the compiler and the CPU, and called through
:mod:`ctypes` on the tensors' memory. Where they cannot be used -- no compiler, ``MMCONV2FORMER_NATIVE=0``,
not CPU fp32, autocast, tracing or compiling (FLOP counters, ONNX and
``torch.compile`` see the standard convolution), an unsupported kernel size
or channel count, or no gradient needed (:func:`native_applies`) --
``ConvNHWC`` runs its plain ``F.conv2d``, with PyTorch's own autograd graph,
and the MLP's backward pass runs operator by operator.
"""
import ctypes
import functools
import hashlib
import os
import os.path as osp
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch.autograd.function import once_differentiable

CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
SOURCES = [osp.join(CSRC, name) for name in ('depthwise_wgrad.cpp', 'mlp_backward.cpp')]
HEADERS = [osp.join(CSRC, 'common.h')]
FLAGS = ['-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-pthread']


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    info = platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith(('model name', 'flags', 'Features')):
                    info += line
                if line.strip() == '':
                    break
    except OSError:
        pass
    return info


def _cache_dir() -> str:
    base = os.environ.get('MMCONV2FORMER_CACHE') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache'), 'mmconv2former')
    return osp.join(base, 'kernels')


def _build(compiler: str) -> str:
    source = b''
    for path in SOURCES + HEADERS:
        with open(path, 'rb') as f:
            source += f.read()
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    key = hashlib.sha256(source + version.encode() + ' '.join(FLAGS).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    target = osp.join(_cache_dir(), f'mmconv2former_{key}.so')
    if osp.exists(target):
        return target
    os.makedirs(osp.dirname(target), exist_ok=True)
    # Build beside the target, then rename: processes of one DDP job may race
    # here, and each sees either no file or a complete one.
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=osp.dirname(target))
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, *SOURCES, '-o', tmp],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f'{compiler} failed: {result.stderr.strip()[-800:]}')
        os.replace(tmp, target)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return target


@functools.lru_cache(maxsize=None)
def native_library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (with one logged reason) where they are unavailable."""
    if os.environ.get('MMCONV2FORMER_NATIVE', '1') == '0':
        return None
    if platform.machine() not in ('x86_64', 'AMD64', 'aarch64', 'arm64'):
        return None
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if compiler is None:
        print_log('Conv2Former: no C++ compiler found; CPU training uses PyTorch\'s '
                  'kernels only (slower). Install g++ to enable the native kernels.',
                  logger='current', level=30)
        return None
    try:
        lib = ctypes.CDLL(_build(compiler))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        print_log(f'Conv2Former: could not build the native kernels ({err}); '
                  "using PyTorch's kernels instead", logger='current', level=30)
        return None
    lib.mmc2f_dw_supported.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.mmc2f_dw_weight_grad.argtypes = [ctypes.c_void_p] * 4 + [
        ctypes.c_long] + [ctypes.c_int] * 5
    lib.mmc2f_mlp_supported.argtypes = [ctypes.c_int]
    lib.mmc2f_mlp_backward.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] + [ctypes.c_int] * 4
    return lib


def tracing() -> bool:
    """Whether a tracer or compiler is recording (jit, dynamo, export): they
    must see standard operators, not ctypes calls or hand-written backwards."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and (
        getattr(compiler, 'is_compiling', lambda: False)()
        or getattr(compiler, 'is_exporting', lambda: False)()))


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == 'cuda' else torch.is_autocast_cpu_enabled()


def _native_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != 'cpu' or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    lib = native_library()
    return lib is not None and bool(lib.mmc2f_dw_supported(weight.shape[-1], weight.shape[0]))


def native_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`depthwise_conv_nhwc` uses the native weight gradient for
    these arguments (the caller has checked stride 1, same padding, depthwise)."""
    if not torch.is_grad_enabled() or not weight.requires_grad or tracing():
        return False
    return not autocast_enabled(x.device.type) and _native_supports(x, weight)


def native_weight_grad(x: torch.Tensor, grad: torch.Tensor,
                       kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(C, 1, k, k)`` and bias ``(C,)`` gradients of the stride-1,
    same-padded depthwise convolution of ``x`` (``(B, H, W, C)``, fp32, CPU)
    whose output received ``grad``, by the native kernel."""
    x, grad = x.contiguous(), grad.contiguous()
    n, h, w, channels = x.shape
    grad_wt = x.new_zeros(kernel_size, kernel_size, channels)
    grad_b = x.new_zeros(channels)
    status = native_library().mmc2f_dw_weight_grad(
        x.data_ptr(), grad.data_ptr(), grad_wt.data_ptr(), grad_b.data_ptr(),
        n, h, w, channels, kernel_size, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f'native depthwise weight gradient rejected shape {tuple(x.shape)}, '
                           f'kernel {kernel_size}; set MMCONV2FORMER_NATIVE=0 and report it')
    return grad_wt.permute(2, 0, 1).reshape(channels, 1, kernel_size, kernel_size), grad_b


def depthwise_forward(x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Stride-1, same-padded depthwise convolution of a ``(B, H, W, C)`` tensor
    (``F.conv2d`` on its channels-last view; the result is channels-last too)."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2,
                   groups=weight.shape[0])
    return out.permute(0, 2, 3, 1)


def depthwise_input_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of :func:`depthwise_forward`: a convolution with the
    flipped kernel, which oneDNN does as fast as the forward pass."""
    k = weight.shape[-1]
    return torch.ops.aten.convolution_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, None, [1, 1], [k // 2, k // 2],
        [1, 1], False, [0, 0], weight.shape[0], [True, False, False])[0].permute(0, 2, 3, 1)


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                          has_bias: bool, native: bool = True
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias gradients of :func:`depthwise_forward`: by the native
    kernel where it supports the arguments (and ``native``), else by PyTorch."""
    if native and _native_supports(x, weight):
        grad_w, grad_b = native_weight_grad(x, grad, weight.shape[-1])
        return grad_w, grad_b if has_bias else None
    k, channels = weight.shape[-1], weight.shape[0]
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [channels] if has_bias else None,
        [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], channels, [False, True, has_bias])
    return grad_w, grad_b


def mlp_backward_supported(f: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`mlp_backward` takes these arguments: CPU fp32, a 3x3
    depthwise kernel, channels a multiple of 8, and the kernels built."""
    if f.device.type != 'cpu' or f.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    lib = native_library()
    return (lib is not None and tuple(weight.shape[1:]) == (1, 3, 3)
            and bool(lib.mmc2f_mlp_supported(weight.shape[0])))


def mlp_backward(f: torch.Tensor, grad_s: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The middle of the MLP, ``s = h + GELU(DW3x3(h) + bias)`` with ``h =
    GELU(f)`` (exact GELU), and its backward pass, in one sweep by the native
    kernel. ``f`` and ``grad_s`` (the gradient at ``s``) are ``(B, H, W, C)``;
    returns ``s``, the gradient at ``f`` (written over ``grad_s``, which must
    not be needed afterwards) and the weight and bias gradients (the latter
    also where ``bias`` is None: the caller drops it)."""
    f, grad_s = f.contiguous(), grad_s.contiguous()
    n, h, w, channels = f.shape
    s = torch.empty_like(f)
    weight_hwc = weight.detach().reshape(channels, 9).t().contiguous()
    bias = bias.detach().contiguous() if bias is not None else None
    grad_w = f.new_zeros(9, channels)
    grad_b = f.new_zeros(channels)
    status = native_library().mmc2f_mlp_backward(
        f.data_ptr(), grad_s.data_ptr(), weight_hwc.data_ptr(),
        bias.data_ptr() if bias is not None else None, s.data_ptr(), grad_w.data_ptr(),
        grad_b.data_ptr(), n, h, w, channels, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f'native MLP backward rejected shape {tuple(f.shape)}; '
                           'set MMCONV2FORMER_NATIVE=0 and report it')
    return s, grad_s, grad_w.t().reshape(channels, 1, 3, 3), grad_b


class _DepthwiseConvNHWC(torch.autograd.Function):
    """:func:`depthwise_forward`, with the native weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return depthwise_forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = depthwise_input_grad(grad, x, weight)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = depthwise_weight_grad(x, grad, weight, ctx.has_bias)
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def depthwise_conv_nhwc(x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Stride-1, same-padded depthwise convolution of a ``(B, H, W, C)``
    tensor: ``F.conv2d``'s output, with the native weight gradient. Only for
    arguments where :func:`native_applies` holds (``ConvNHWC`` checks)."""
    return _DepthwiseConvNHWC.apply(x, weight, bias)


__all__ = ['autocast_enabled', 'depthwise_conv_nhwc', 'depthwise_forward', 'depthwise_input_grad',
           'depthwise_weight_grad', 'mlp_backward', 'mlp_backward_supported', 'native_applies',
           'native_library', 'native_weight_grad', 'tracing']
