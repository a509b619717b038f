"""Developer probe, not a user tool: the depthwise convolutions of a
Conv2Former-T and a ConvNeXt-T training step, each direction timed alone on
the GPU, in every implementation at hand.

    python tools/dev/depthwise_conv_probe.py --json dw.json              # on a CUDA GPU
    TRITON_INTERPRET=1 python tools/dev/depthwise_conv_probe.py --device cpu   # correctness only

Why: the depthwise convolutions are the one part of the block that is
neither a matrix product nor elementwise work that ``torch.compile`` fuses.
PyTorch sends a channels-last depthwise convolution to cuDNN, an NCHW one in
bf16 or with a kernel other than 3x3/5x5 to its own generic kernel, and
neither is known to be fast for an 11x11 kernel or for the weight gradient.
This probe answers, per layer shape of the two models' training steps (bf16,
batch 64 at 224x224 and batch 4 at 1024x1024):

* forward, input gradient and weight gradient, each timed alone (CUDA
  events, median), for cuDNN on channels-last data (what the models run),
  PyTorch on NCHW data, and a candidate Triton kernel on channels-last data;
* each one's rate against the direction's arithmetic (2 K^2 N H W C flops);
* per model and batch shape, the sum over all its blocks: the milliseconds a
  training step spends in depthwise convolutions with each implementation.

The Triton candidate computes in fp32 from bf16 (or fp32) data: the forward
pass and the input gradient (the same kernel over the flipped weights: for an
odd kernel with "same" padding, dL/dx is dL/dy convolved with the kernel
turned by 180 degrees) and the weight gradient (per kernel row and channel
block, a slice of the rows, the products summed over the row's pixels and
atomically added). It supports what the models use: stride 1, padding K//2,
odd K, channels-last contiguous data. It is checked against ``F.conv2d`` in
fp32 before it is timed; on a CPU, under Triton's interpreter, the check is
all that runs. It would move into the package, behind a standard autograd
operator with a PyTorch fallback, only if this table shows that it pays.
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the probe still times cuDNN and PyTorch's kernel
    triton = None

#: (model, kernel, [(channels, blocks) per stage]) for the two models' depthwise convolutions.
LAYERS = [
    ('Conv2Former-T', 11, [(72, 3), (144, 3), (288, 12), (576, 3)]),   # the modulation's large kernel
    ('Conv2Former-T', 3, [(288, 3), (576, 3), (1152, 12), (2304, 3)]),  # the MLP's 3x3 on 4C channels
    ('ConvNeXt-T', 7, [(96, 3), (192, 3), (384, 9), (768, 3)]),
]
#: (batch, input side) of the training steps; stage s works at side / 2**(s+2).
SHAPES = [(64, 224), (4, 1024)]
#: ``--tiny``: the code paths at shapes the interpreter runs in seconds.
TINY_LAYERS, TINY_SHAPES = [('tiny', 3, [(8, 1)]), ('tiny', 5, [(40, 2), (24, 1)])], [(1, 36)]
#: (BLOCK_W, BLOCK_C, num_warps) tried for each Triton kernel; the fastest counts.
FORWARD_CONFIGS = [(16, 32, 4), (32, 32, 4), (16, 64, 4), (8, 64, 2)]
WGRAD_CONFIGS = [(8, 32, 4), (16, 32, 4), (8, 64, 4)]


# ---------------------------------------------------------------------------- Triton candidate
if triton is not None:
    @triton.jit
    def _dw_forward(x_ptr, w_ptr, y_ptr, H, W, C, K: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        """One output row segment: y[n, h, w:w+BW, c:c+BC] = sum over the
        K x K window of x * w[kh, kw, c] (w laid out [K*K, C])."""
        row = tl.program_id(0)  # n * H + h
        n = row // H
        h = row % H
        w_offs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c_offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c_offs < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for kh in range(K):
            ih = h + kh - K // 2
            row_ok = (ih >= 0) & (ih < H)
            base = x_ptr + (n * H + ih) * W * C
            for kw in tl.static_range(K):
                iw = w_offs + kw - K // 2
                mask = row_ok & ((iw >= 0) & (iw < W))[:, None] & c_mask[None, :]
                xv = tl.load(base + iw[:, None] * C + c_offs[None, :], mask=mask, other=0.0)
                wv = tl.load(w_ptr + (kh * K + kw) * C + c_offs, mask=c_mask, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        out = y_ptr + row * W * C + w_offs[:, None] * C + c_offs[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(w_offs < W)[:, None] & c_mask[None, :])

    @triton.jit
    def _dw_weight_grad(x_ptr, dy_ptr, dw_ptr, H, W, C, ROWS, ROWS_PER_PROGRAM, K: tl.constexpr,
                        K_PAD: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """dw[kh, :, c] over rows [s * RPP, (s + 1) * RPP) of the N * H
        output rows: every kw of kernel row kh at once, the window's K input
        pixels loaded as one [K_PAD, BLOCK_W, BLOCK_C] tile; fp32 partial
        sums atomically added into dw (fp32, [K*K, C])."""
        kh = tl.program_id(0)
        c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c_offs < C
        kw = tl.arange(0, K_PAD)
        acc = tl.zeros((K_PAD, BLOCK_W, BLOCK_C), dtype=tl.float32)
        first = tl.program_id(2) * ROWS_PER_PROGRAM
        last = tl.minimum(first + ROWS_PER_PROGRAM, ROWS)
        for row in range(first, last):
            n = row // H
            ih = row % H + kh - K // 2
            row_ok = (ih >= 0) & (ih < H)
            x_row = x_ptr + (n * H + ih) * W * C
            dy_row = dy_ptr + row * W * C
            for w0 in range(0, W, BLOCK_W):
                w_offs = w0 + tl.arange(0, BLOCK_W)
                dy = tl.load(dy_row + w_offs[:, None] * C + c_offs[None, :],
                             mask=(w_offs < W)[:, None] & c_mask[None, :], other=0.0)
                iw = w_offs[None, :, None] + kw[:, None, None] - K // 2
                mask = row_ok & (iw >= 0) & (iw < W) & (kw < K)[:, None, None] & c_mask[None, None, :]
                xv = tl.load(x_row + iw * C + c_offs[None, None, :], mask=mask, other=0.0)
                acc += xv.to(tl.float32) * dy.to(tl.float32)[None, :, :]
        dw = tl.sum(acc, axis=1)
        tl.atomic_add(dw_ptr + (kh * K + kw)[:, None] * C + c_offs[None, :], dw,
                      mask=(kw < K)[:, None] & c_mask[None, :])


def _check_supported(x: torch.Tensor, weight: torch.Tensor) -> Tuple[int, int, int, int, int]:
    n, c, h, w = x.shape
    k = weight.shape[-1]
    if weight.shape != (c, 1, k, k) or k % 2 == 0:
        raise ValueError(f'depthwise weight [C, 1, K, K] with odd K expected, got {tuple(weight.shape)}')
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError('channels-last contiguous input expected')
    if x.numel() >= 2 ** 31:
        raise ValueError('the kernels index with 32-bit integers: fewer than 2**31 elements')
    return n, c, h, w, k


def triton_forward(x: torch.Tensor, weight: torch.Tensor, config: Sequence[int] = FORWARD_CONFIGS[0]
                   ) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=K // 2, groups=C)`` for channels-last
    ``x`` (NCHW shape), with the Triton kernel."""
    n, c, h, w, k = _check_supported(x, weight)
    block_w, block_c, warps = config
    taps = weight.reshape(c, k * k).t().contiguous()  # [K*K, C]: a tap's channels side by side
    y = torch.empty_like(x)  # channels-last, like x
    grid = (n * h, triton.cdiv(w, block_w), triton.cdiv(c, block_c))
    _dw_forward[grid](x, taps, y, h, w, c, K=k, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    return y


def triton_input_grad(dy: torch.Tensor, weight: torch.Tensor, config: Sequence[int] = FORWARD_CONFIGS[0]
                      ) -> torch.Tensor:
    """dL/dx: ``dy`` through the same kernel with the weights turned by 180 degrees."""
    return triton_forward(dy, weight.flip(-1, -2), config)


def triton_weight_grad(x: torch.Tensor, dy: torch.Tensor, k: int, config: Sequence[int] = WGRAD_CONFIGS[0],
                       programs: Optional[int] = None) -> torch.Tensor:
    """dL/dw ``[C, 1, K, K]`` (fp32) of the depthwise convolution."""
    n, c, h, w, _ = _check_supported(x, torch.empty(x.shape[1], 1, k, k))
    block_w, block_c, warps = config
    if programs is None:  # about four waves of the GPU's multiprocessors; on a CPU (the interpreter),
        # enough to exercise the split-and-add path
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 64
    rows = n * h
    splits = max(1, min(rows, triton.cdiv(programs, k * triton.cdiv(c, block_c))))
    per_program = triton.cdiv(rows, splits)
    dw = torch.zeros(k * k, c, device=x.device, dtype=torch.float32)
    grid = (k, triton.cdiv(c, block_c), triton.cdiv(rows, per_program))
    _dw_weight_grad[grid](x, dy, dw, h, w, c, rows, per_program, K=k, K_PAD=triton.next_power_of_2(k),
                          BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    return dw.t().reshape(c, 1, k, k)


# ---------------------------------------------------------------------------- PyTorch
def torch_directions(x: torch.Tensor, weight: torch.Tensor) -> Dict[str, Callable[[torch.Tensor], Any]]:
    """Forward, input gradient and weight gradient through ATen (cuDNN or
    PyTorch's own kernel, as the dispatcher picks for ``x``'s layout)."""
    k, c = weight.shape[-1], weight.shape[0]
    args = ([1, 1], [k // 2] * 2, [1, 1], False, [0, 0], c)

    def grad(dy: torch.Tensor, mask: List[bool]) -> torch.Tensor:
        out = torch.ops.aten.convolution_backward(dy, x, weight, None, *args, mask)
        return out[0] if mask[0] else out[1]
    return {'forward': lambda _: F.conv2d(x, weight, padding=k // 2, groups=c),
            'input grad': lambda dy: grad(dy, [True, False, False]),
            'weight grad': lambda dy: grad(dy, [False, True, False])}


def reference(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The three directions in fp64 on the CPU."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    y = F.conv2d(x64, w64, padding=weight.shape[-1] // 2, groups=weight.shape[0])
    y.backward(dy.double().cpu())
    return {'forward': y.detach(), 'input grad': x64.grad, 'weight grad': w64.grad}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_triton(device: str, dtype: torch.dtype, shapes: Sequence[Tuple[int, int, int, int, int]]
                 ) -> List[Dict[str, Any]]:
    """The Triton directions against fp64 on fresh random data, every config."""
    results = []
    for n, c, h, w, k in shapes:
        x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, 1, k, k, device=device, dtype=dtype)
        dy = torch.randn_like(x)
        want = reference(x, weight, dy)
        for config in FORWARD_CONFIGS[:1 if device == 'cpu' else None]:
            for name, got in (('forward', triton_forward(x, weight, config)),
                              ('input grad', triton_input_grad(dy, weight, config))):
                results.append(dict(shape=(n, c, h, w, k), direction=name, config=config,
                                    error=relative_error(got, want[name]),
                                    layout=got.is_contiguous(memory_format=torch.channels_last)))
        for config in WGRAD_CONFIGS[:1 if device == 'cpu' else None]:
            got = triton_weight_grad(x, dy, k, config)
            results.append(dict(shape=(n, c, h, w, k), direction='weight grad', config=config,
                                error=relative_error(got, want['weight grad']), layout=True))
    limit = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 data, fp32 sums: the output's rounding
    for r in results:
        r['passed'] = r['error'] <= limit and r['layout']
    return results


# ---------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], Any], device: str, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU), after warm-up."""
    for _ in range(min(3, repeats)):
        fn()
    if device == 'cpu':
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def time_layer(n: int, c: int, side: int, k: int, device: str, dtype: torch.dtype, with_triton: bool,
               repeats: int = 20) -> Dict[str, Dict[str, Any]]:
    """``{implementation: {direction: ms}}`` for one layer shape."""
    x = torch.randn(n, c, side, side, device=device, dtype=dtype)
    weight = torch.randn(c, 1, k, k, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    out: Dict[str, Dict[str, Any]] = {}
    for label, layout in (('cuDNN, channels-last', torch.channels_last),
                          ('PyTorch, NCHW', torch.contiguous_format)):
        xl, dyl = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
        fns = torch_directions(xl, weight)
        out[label] = {d: time_ms(lambda f=f: f(dyl), device, repeats) for d, f in fns.items()}
    if with_triton:
        xl, dyl = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        best: Dict[str, Any] = {}
        for config in FORWARD_CONFIGS:
            for d, fn in (('forward', lambda cf=config: triton_forward(xl, weight, cf)),
                          ('input grad', lambda cf=config: triton_input_grad(dyl, weight, cf))):
                ms = time_ms(fn, device, repeats)
                if ms < best.get(d, (float('inf'),))[0]:
                    best[d] = (ms, config)
        for config in WGRAD_CONFIGS:
            ms = time_ms(lambda cf=config: triton_weight_grad(xl, dyl, k, cf), device, repeats)
            if ms < best.get('weight grad', (float('inf'),))[0]:
                best['weight grad'] = (ms, config)
        out['Triton, channels-last'] = {d: v[0] for d, v in best.items()}
        out['Triton, channels-last']['configs'] = {d: v[1] for d, v in best.items()}
    return out


def probe(device: str, dtype: torch.dtype, budget: float, tiny: bool = False, with_triton: bool = True
          ) -> Dict[str, Any]:
    """Every layer shape of :data:`LAYERS` at :data:`SHAPES` (``tiny``:
    :data:`TINY_LAYERS` at :data:`TINY_SHAPES`, one timed call: the code paths only)."""
    start, rows, totals = time.perf_counter(), [], {}
    with_triton = with_triton and triton is not None
    for model, k, stages in (TINY_LAYERS if tiny else LAYERS):
        for batch, side in (TINY_SHAPES if tiny else SHAPES):
            key = f'{model} {k}x{k}, batch {batch} at {side}x{side}'
            for s, (c, blocks) in enumerate(stages):
                if time.perf_counter() - start > budget:
                    rows.append(dict(layer=key, stage=s + 1, skipped=f'over the {budget:.0f} s budget'))
                    continue
                hw = side // 2 ** (s + 2)
                times = time_layer(batch, c, hw, k, device, dtype, with_triton, 1 if tiny else 20)
                flop = 2 * k * k * batch * c * hw * hw
                row = dict(layer=key, stage=s + 1, shape=[batch, c, hw, hw], kernel=k, blocks=blocks,
                           gflop=flop / 1e9, times=times)
                rows.append(row)
                print_row(row)
                for impl, t in times.items():
                    total = totals.setdefault(key, {}).setdefault(impl, 0.0)
                    totals[key][impl] = total + blocks * sum(v for d, v in t.items() if d != 'configs')
            if key in totals:
                print(f'  {key}: all blocks, forward + both gradients: ' + ', '.join(
                    f'{impl} {ms:.2f} ms' for impl, ms in totals[key].items()), flush=True)
    return dict(rows=rows, totals=totals)


def print_row(row: Dict[str, Any]) -> None:
    b, c, h, w = row['shape']
    print(f'{row["layer"]:<44} stage {row["stage"]} [{b}, {c}, {h}, {w}] x{row["blocks"]}', flush=True)
    for impl, t in row['times'].items():
        cells = '  '.join(f'{d} {t[d]:7.3f} ms ({row["gflop"] / t[d]:6.1f} TFLOP/s)'
                          for d in ('forward', 'input grad', 'weight grad') if d in t)
        print(f'    {impl:<22} {cells}', flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='cuda (default), or cpu: check the Triton kernels '
                        'under TRITON_INTERPRET=1')
    parser.add_argument('--tiny', action='store_true', help='time every path once at tiny shapes (with '
                        '--device cpu: checks that the timing code runs)')
    parser.add_argument('--dtype', choices=['bf16', 'fp32'], default='bf16')
    parser.add_argument('--budget', type=float, default=120, help='seconds for the timings (default 120)')
    parser.add_argument('--json', metavar='PATH', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    cpu = args.device == 'cpu'
    if cpu and os.environ.get('TRITON_INTERPRET') != '1' and triton is not None:
        parser.error('on a CPU the Triton kernels run under the interpreter: set TRITON_INTERPRET=1')
    if not cpu and not torch.cuda.is_available():
        parser.error('no CUDA device here; use --device cpu with TRITON_INTERPRET=1 to check the kernels')
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    result: Dict[str, Any] = dict(device=torch.cuda.get_device_name() if not cpu else 'cpu',
                                  torch=torch.__version__, triton=getattr(triton, '__version__', None),
                                  cudnn=torch.backends.cudnn.version(), dtype=args.dtype, checks=[])
    print(f'# {result["device"]}, torch {result["torch"]}, cuDNN {result["cudnn"]}, '
          f'Triton {result["triton"]}, {args.dtype}', flush=True)
    if triton is None:
        print('# Triton is not installed: cuDNN and PyTorch only', flush=True)
    else:
        shapes = [(2, 40, 9, 13, 5), (1, 24, 7, 7, 3)] if cpu else \
            [(4, 72, 56, 56, 11), (2, 288, 14, 14, 3), (2, 96, 28, 28, 7), (1, 576, 7, 7, 11)]
        for dt in ([torch.float32, dtype] if dtype != torch.float32 else [dtype]):
            for check in check_triton(args.device, dt, shapes):
                check['dtype'] = str(dt)
                result['checks'].append(check)
                print(f'  [{"ok" if check["passed"] else "FAILED"}] Triton {check["direction"]}, '
                      f'{check["dtype"]}, shape {check["shape"]}, config {check["config"]}: '
                      f'relative error {check["error"]:.1e}', flush=True)
    failed = [c for c in result['checks'] if not c['passed']]
    if not cpu or args.tiny:
        torch.backends.cudnn.benchmark = True
        if failed:  # a kernel that failed its check is not timed
            print('# a Triton check failed: timing cuDNN and PyTorch only', flush=True)
        result.update(probe(args.device, dtype, args.budget, args.tiny, with_triton=not failed))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    result['failed'] = len(failed)
    return result


if __name__ == '__main__':
    sys.exit(1 if main()['failed'] else 0)
