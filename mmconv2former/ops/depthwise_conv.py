"""Depthwise convolution on channels-last data in Triton: a GPU candidate.

What it replaces: ``F.conv2d(x, w, b, padding=K // 2, groups=C)`` on
``(B, H, W, C)`` data, one operator, forward and backward, behind a standard
PyTorch custom operator (``torch.library.custom_op``), so that autograd,
``torch.compile`` (which sees an opaque operator with a shape function),
selective activation checkpointing and forward hooks on the module treat it
as any other operator. ``Conv2Former(depthwise_impl='triton')`` routes the
blocks' depthwise convolutions through :func:`depthwise_conv_nhwc`; the
default stays PyTorch's (cuDNN on a GPU) until the GPU table in
``docs/gpu_benchmark.md`` shows that this pays.

Why a kernel of our own may pay: PyTorch sends a channels-last depthwise
convolution to cuDNN, whose kernels for large windows (11x11 here) and for
the weight gradient are not known to be fast, and an NCHW one with a kernel
other than 3x3/5x5 to a generic kernel. ``tools/dev/depthwise_conv_probe.py``
times all three per layer shape.

The kernels compute in fp32 from bf16, fp16 or fp32 data:

* forward: each program sums the K x K windows of a block of output rows,
  pixels and channels, each input row segment loaded once per kernel column
  for all the output rows it serves;
* input gradient: for an odd kernel with "same" padding, dL/dx is dL/dy
  convolved with the kernel turned by 180 degrees, so the forward kernel
  serves;
* weight gradient: a program takes a block of kernel taps (in row-major
  order, so that only the last block is short), a block of channels and a
  slice of the N * H output rows, loads each output pixel's input pixels
  under those taps as one tile, and atomically adds its fp32 partial sums.

Where Triton, CUDA or ``torch.library.custom_op`` (torch >= 2.4) is absent,
or the convolution is not one the kernels cover (stride 1, dilation 1, odd
square kernel, padding K // 2, one channel per group), the data are not
fp32/bf16/fp16, or deterministic algorithms are asked for, the call runs
``F.conv2d`` instead. On a CPU the kernels run under Triton's interpreter
when ``TRITON_INTERPRET=1`` was set before this module was imported (the
tests do so). The Triton path supports one backward pass (double backward
needs ``'torch'``).
"""
import contextlib
import math
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a Triton that cannot load here: PyTorch serves
    triton = None

#: ``(BLOCK_H, BLOCK_W, BLOCK_C, num_warps)`` of the forward (and input-gradient)
#: kernel and ``(BLOCK_W, BLOCK_C, num_warps)`` of the weight-gradient kernel;
#: the probe times alternatives.
FORWARD_CONFIG: Tuple[int, int, int, int] = (1, 16, 32, 4)
WEIGHT_GRAD_CONFIG: Tuple[int, int, int] = (8, 32, 4)
#: Index arithmetic is 32-bit: larger tensors go to PyTorch.
MAX_ELEMENTS = 2 ** 31 - 1

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
AVAILABLE = triton is not None and hasattr(torch.library, 'custom_op')


if triton is not None:
    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        C_DIV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # y[n, h0:h0+BH, w0:w0+BW, c0:c0+BC]; x and y (B, H, W, C) contiguous, w (K*K, C).
        # Each input row segment is loaded once per kw and serves the BLOCK_H
        # output rows whose windows hold it (BLOCK_H = 1: one row, every load
        # used once per tap; larger: fewer loads, some multiply-adds by zero).
        C = (C // C_DIV) * C_DIV  # see _c_div
        pid = tl.program_id(0)  # n * cdiv(H, BLOCK_H) + row block
        row_blocks = tl.cdiv(H, BLOCK_H)
        n = pid // row_blocks
        h0 = (pid % row_blocks) * BLOCK_H
        rows = tl.arange(0, BLOCK_H)
        w_offs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c_offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c_offs < C
        acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in range(BLOCK_H + K - 1):
            ih = h0 + i - K // 2
            row_ok = (ih >= 0) & (ih < H)
            x_row = x_ptr + (n * H + ih) * W * C
            kh = i - rows  # the kernel row at which input row ih meets output row h0 + r
            kh_ok = (kh >= 0) & (kh < K)
            for kw in tl.static_range(K):
                iw = w_offs + kw - K // 2
                mask = row_ok & ((iw >= 0) & (iw < W))[:, None] & c_mask[None, :]
                xv = tl.load(x_row + iw[:, None] * C + c_offs[None, :], mask=mask, other=0.0)
                wv = tl.load(w_ptr + (kh * K + kw)[:, None] * C + c_offs[None, :],
                             mask=kh_ok[:, None] & c_mask[None, :], other=0.0)
                acc += xv.to(tl.float32)[None, :, :] * wv.to(tl.float32)[:, None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)[None, None, :]
        oh = h0 + rows
        out = y_ptr + ((n * H + oh) * W * C)[:, None, None] + (w_offs * C)[None, :, None] + c_offs[None, None, :]
        mask = (oh < H)[:, None, None] & (w_offs < W)[None, :, None] & c_mask[None, None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _weight_grad_kernel(x_ptr, dy_ptr, dw_ptr, H, W, C, ROWS, ROWS_PER_PROGRAM, K: tl.constexpr,
                            C_DIV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        # dw[t0:t0+BT, c0:c0+BC] (fp32, (K*K, C), tap t = kh * K + kw) over output rows
        # [s * RPP, (s + 1) * RPP). BLOCK_T is K rounded up to a power of two (a block's
        # size must be one). The taps are cut into blocks in their flat order, not one
        # kernel row per block, so that only the last block has idle lanes: at K = 11,
        # 8 blocks of 16 for 121 taps, against 11 rows padded to 16 (176); at no K
        # more than a row per block would have.
        C = (C // C_DIV) * C_DIV  # see _c_div
        taps = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        tap_ok = taps < K * K
        off_h = taps // K - K // 2  # each tap's input pixel, from the output pixel
        off_w = taps % K - K // 2
        c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c_offs < C
        acc = tl.zeros((BLOCK_T, BLOCK_W, BLOCK_C), dtype=tl.float32)
        first = tl.program_id(2) * ROWS_PER_PROGRAM
        last = tl.minimum(first + ROWS_PER_PROGRAM, ROWS)
        for row in range(first, last):
            n = row // H
            ih = row % H + off_h
            tap_row_ok = tap_ok & (ih >= 0) & (ih < H)
            x_rows = (n * H + ih) * W  # each tap's input row, in pixels
            dy_row = dy_ptr + row * W * C
            for w0 in range(0, W, BLOCK_W):
                w_offs = w0 + tl.arange(0, BLOCK_W)
                dy = tl.load(dy_row + w_offs[:, None] * C + c_offs[None, :],
                             mask=(w_offs < W)[:, None] & c_mask[None, :], other=0.0)
                iw = w_offs[None, :] + off_w[:, None]
                mask = (tap_row_ok[:, None] & (iw >= 0) & (iw < W))[:, :, None] & c_mask[None, None, :]
                xv = tl.load(x_ptr + (x_rows[:, None] + iw)[:, :, None] * C + c_offs[None, None, :], mask=mask,
                             other=0.0)
                acc += xv.to(tl.float32) * dy.to(tl.float32)[None, :, :]
        tl.atomic_add(dw_ptr + taps[:, None] * C + c_offs[None, :], tl.sum(acc, axis=1),
                      mask=tap_ok[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------- kernel launchers
def _c_div(c: int) -> int:
    """The largest power of two up to 16 that divides the channel count, for
    the kernels' ``C_DIV``. With it Triton can prove that each pixel's
    channels start on a multiple of ``C_DIV`` elements, and so loads them as
    vectors. By itself Triton notices only a count divisible by 16, not
    Conv2Former-T's first stage's 72; without the hint (``C = (C // C_DIV) *
    C_DIV`` in the kernels) that stage loads one element per instruction."""
    return math.gcd(c, 16)


def _tap_block(k: int) -> int:
    """Kernel taps per weight-gradient program: K rounded up to a power of two
    (see ``_weight_grad_kernel``)."""
    return triton.next_power_of_2(k)


def _on(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


def forward_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 config: Sequence[int] = FORWARD_CONFIG, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton forward pass: ``x`` ``(B, H, W, C)``, ``weight``
    ``(C, 1, K, K)``, ``bias`` ``(C,)`` or None; returns a contiguous
    ``(B, H, W, C)`` tensor: ``out`` where given (contiguous, ``x``'s shape,
    dtype and device), which lets a check fill it with NaN first and so see
    any element the kernel did not write."""
    x = x.contiguous()
    n, h, w, c = x.shape
    k = weight.shape[-1]
    block_h, block_w, block_c, warps = config
    taps = weight.reshape(c, k * k).t().contiguous()  # (K*K, C): one tap's channels side by side
    if out is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous {tuple(x.shape)} {x.dtype} tensor on {x.device}, like x; '
                         f'got {tuple(out.shape)} {out.dtype} on {out.device}'
                         f'{"" if out.is_contiguous() else ", not contiguous"}')
    else:
        y = out
    grid = (n * triton.cdiv(h, block_h), triton.cdiv(w, block_w), triton.cdiv(c, block_c))
    with _on(x.device):
        _forward_kernel[grid](x, taps, taps if bias is None else bias.contiguous(), y, h, w, c, K=k,
                              HAS_BIAS=bias is not None, C_DIV=_c_div(c), BLOCK_H=block_h, BLOCK_W=block_w,
                              BLOCK_C=block_c, num_warps=warps)
    return y


def input_grad_nhwc(dy: torch.Tensor, weight: torch.Tensor, config: Sequence[int] = FORWARD_CONFIG,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dx: ``dy`` through the forward kernel with the kernel turned by 180
    degrees (into ``out`` where given, as in :func:`forward_nhwc`)."""
    return forward_nhwc(dy, weight.flip(-1, -2), None, config, out)


def weight_grad_nhwc(x: torch.Tensor, dy: torch.Tensor, k: int, config: Sequence[int] = WEIGHT_GRAD_CONFIG,
                     programs: Optional[int] = None) -> torch.Tensor:
    """dL/dw as a contiguous fp32 ``(C, 1, K, K)`` tensor."""
    x, dy = x.contiguous(), dy.contiguous()
    n, h, w, c = x.shape
    block_w, block_c, warps = config
    block_t = _tap_block(k)
    if programs is None:  # about four waves of the GPU; on a CPU (the interpreter) enough to split rows
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 64
    rows = n * h
    tap_blocks = triton.cdiv(k * k, block_t)
    splits = max(1, min(rows, triton.cdiv(programs, tap_blocks * triton.cdiv(c, block_c))))
    per_program = triton.cdiv(rows, splits)
    dw = torch.zeros(k * k, c, device=x.device, dtype=torch.float32)
    grid = (tap_blocks, triton.cdiv(c, block_c), triton.cdiv(rows, per_program))
    with _on(x.device):
        _weight_grad_kernel[grid](x, dy, dw, h, w, c, rows, per_program, K=k, C_DIV=_c_div(c),
                                  BLOCK_T=block_t, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    return dw.t().contiguous().view(c, 1, k, k)


# ---------------------------------------------------------------------------- the operators
if AVAILABLE:
    # Three operators, so that a profile and a checkpointing policy tell the
    # forward pass (which recomputation may run again) from the two gradients.
    @torch.library.custom_op('mmconv2former::depthwise_conv_nhwc', mutates_args=())
    def _depthwise_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return forward_nhwc(x, weight, bias)

    @_depthwise_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape)

    @torch.library.custom_op('mmconv2former::depthwise_conv_nhwc_input_grad', mutates_args=())
    def _input_grad_op(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return input_grad_nhwc(dy, weight)

    @_input_grad_op.register_fake
    def _(dy, weight):
        return dy.new_empty(dy.shape)

    @torch.library.custom_op('mmconv2former::depthwise_conv_nhwc_weight_grad', mutates_args=())
    def _weight_grad_op(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # ``weight`` gives the kernel's shape (and names it in a profile).
        return weight_grad_nhwc(x, dy, weight.shape[-1]).to(weight.dtype)

    @_weight_grad_op.register_fake
    def _(x, dy, weight):
        return weight.new_empty(weight.shape)

    def _setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def _backward(ctx, dy: torch.Tensor):
        # Not differentiable again: double backward needs depthwise_impl='torch'.
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _input_grad_op(dy, weight) if ctx.needs_input_grad[0] else None
        dw = _weight_grad_op(x, dy, weight) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 1, 2), dtype=torch.float32).to(weight.dtype)
        return dx, dw, db

    _depthwise_op.register_autograd(_backward, setup_context=_setup_context)
    #: The forward operator as selective checkpointing policies see it.
    DEPTHWISE_OP = torch.ops.mmconv2former.depthwise_conv_nhwc.default
else:
    DEPTHWISE_OP = None


def covers(conv: torch.nn.Conv2d) -> bool:
    """Whether the kernels compute what ``conv`` does: one channel per group,
    stride 1, dilation 1, an odd square kernel with padding K // 2."""
    k = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1] and k[0] % 2 == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (k[0] // 2,) * 2
            and conv.padding_mode == 'zeros')


def runs_here(x: torch.Tensor) -> bool:
    """Whether :func:`depthwise_conv_nhwc` runs the Triton kernels for ``x``:
    not where deterministic algorithms are asked for (the weight gradient
    adds partial sums atomically, in no fixed order)."""
    return (AVAILABLE and (x.is_cuda or INTERPRETED) and x.numel() <= MAX_ELEMENTS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not torch.are_deterministic_algorithms_enabled())


def depthwise_conv_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, H, W, C)`` depthwise convolution with ``padding=K // 2`` (see
    :func:`covers`): the Triton operator where it runs, else ``F.conv2d``.

    Under autocast the inputs are cast as autocast casts a convolution's
    (PyTorch does not autocast custom operators).
    """
    if not runs_here(x):
        k = weight.shape[-1]
        return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2,
                        groups=weight.shape[0]).permute(0, 2, 3, 1)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _depthwise_op(x.contiguous(), weight, bias)


__all__ = ['AVAILABLE', 'DEPTHWISE_OP', 'covers', 'depthwise_conv_nhwc', 'forward_nhwc', 'input_grad_nhwc',
           'runs_here', 'weight_grad_nhwc']
