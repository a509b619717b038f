"""Developer probe, not a user tool: the depthwise convolutions of a
Conv2Former-T and a ConvNeXt-T training step, each direction timed alone on
the GPU, in every implementation at hand.

    python tools/dev/depthwise_conv_probe.py --json dw.json              # on a CUDA GPU
    TRITON_INTERPRET=1 python tools/dev/depthwise_conv_probe.py --device cpu   # correctness only
    python tools/dev/depthwise_conv_probe.py --resources   # no GPU: compile for sm_90, registers, spills

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

The Triton kernels are the package's (``mmconv2former/ops/depthwise_conv.py``,
what ``Conv2Former(depthwise_impl='triton')`` runs), each tried in the block
shapes of ``FORWARD_CONFIGS`` and ``WGRAD_CONFIGS`` (the fastest counts and is
named), after a check against fp64 on fresh random data. On a CPU, under
Triton's interpreter, the check is all that runs (``--tiny`` adds the timing
code at tiny shapes). The operator becomes the default only if this table
and gpu_benchmark.py's training rows show that it pays.
"""
import argparse
import itertools
import os.path as osp
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # run from a checkout

from mmconv2former.engine.profiling import DeviceLost, one_line, release, save_results  # noqa: E402
from mmconv2former.ops import depthwise_conv as dw  # noqa: E402

#: (model, kernel, [(channels, blocks) per stage]) for the two models' depthwise convolutions.
LAYERS = [
    ('Conv2Former-T', 11, [(72, 3), (144, 3), (288, 12), (576, 3)]),   # the modulation's large kernel
    ('ConvNeXt-T', 7, [(96, 3), (192, 3), (384, 9), (768, 3)]),         # its peer, before what --budget cuts
    ('Conv2Former-T', 3, [(288, 3), (576, 3), (1152, 12), (2304, 3)]),  # the MLP's 3x3 on 4C channels
]
#: (batch, input side) of the training steps; stage s works at side / 2**(s+2).
SHAPES = [(64, 224), (4, 1024)]
#: ``--tiny``: the code paths at shapes the interpreter runs in seconds.
TINY_LAYERS, TINY_SHAPES = [('tiny', 3, [(8, 1)]), ('tiny', 5, [(40, 2), (24, 1)])], [(1, 36)]
#: Block shapes tried for each Triton kernel, the package's default first; the
#: fastest counts. Forward: (BLOCK_H, BLOCK_W, BLOCK_C, num_warps).
FORWARD_CONFIGS = [dw.FORWARD_CONFIG, (1, 32, 32, 4), (1, 16, 64, 4), (4, 16, 32, 4), (4, 8, 64, 4)]
WGRAD_CONFIGS = [dw.WEIGHT_GRAD_CONFIG, (16, 32, 4), (8, 64, 4)]


# ---------------------------------------------------------------------------- Triton candidate
def triton_forward(x: torch.Tensor, weight: torch.Tensor, config: Sequence[int] = FORWARD_CONFIGS[0],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The package's forward kernel on channels-last ``x`` of NCHW shape
    (into ``out``, ``(B, H, W, C)``, where given)."""
    return dw.forward_nhwc(x.permute(0, 2, 3, 1), weight, None, config, out).permute(0, 3, 1, 2)


def triton_input_grad(dy: torch.Tensor, weight: torch.Tensor, config: Sequence[int] = FORWARD_CONFIGS[0],
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return dw.input_grad_nhwc(dy.permute(0, 2, 3, 1), weight, config, out).permute(0, 3, 1, 2)


def triton_weight_grad(x: torch.Tensor, dy: torch.Tensor, k: int, config: Sequence[int] = WGRAD_CONFIGS[0]
                       ) -> torch.Tensor:
    return dw.weight_grad_nhwc(x.permute(0, 2, 3, 1), dy.permute(0, 2, 3, 1), k, config)


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


def check_triton(device: str, dtype: torch.dtype, shapes: Sequence[Tuple[int, int, int, int, int]],
                 every_config: bool = True) -> Iterator[Dict[str, Any]]:
    """The Triton directions against fp64 on fresh random data, every config
    (``every_config=False``: the package's own, ``FORWARD_CONFIG`` and
    ``WEIGHT_GRAD_CONFIG``), one check at a time. A kernel that raises (one
    that does not compile or launch here) is a failed check with its error,
    not the end of the run; :class:`DeviceLost` ends the checks if the GPU
    stopped answering."""
    limit = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 data, fp32 sums: the output's rounding
    for n, c, h, w, k in shapes:
        x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, 1, k, k, device=device, dtype=dtype)
        dy = torch.randn_like(x)
        want = reference(x, weight, dy)
        # Under the interpreter: the default and the first multi-row block shape.
        configs = FORWARD_CONFIGS if device != 'cpu' else \
            [cf for i, cf in enumerate(FORWARD_CONFIGS) if i == 0 or cf[0] > 1][:2]
        configs = configs if every_config else configs[:1]
        # The forward kernel writes into an output filled with NaN: memory
        # fresh from the allocator may hold the previous block shape's right
        # answer, which would hide elements a block shape leaves unwritten.
        # (The weight gradient starts from zeros and adds: a block it misses
        # stays zero, far from the reference.)
        def nan() -> torch.Tensor:
            return torch.full((n, h, w, c), float('nan'), device=device, dtype=dtype)
        runs = [(name, config, fn) for config in configs
                for name, fn in (('forward', lambda cf=config: triton_forward(x, weight, cf, nan())),
                                 ('input grad', lambda cf=config: triton_input_grad(dy, weight, cf, nan())))]
        runs += [('weight grad', config, lambda cf=config: triton_weight_grad(x, dy, k, cf))
                 for config in WGRAD_CONFIGS[:1 if device == 'cpu' or not every_config else None]]
        for name, config, fn in runs:
            row = dict(shape=(n, c, h, w, k), direction=name, config=config)
            try:  # (a GPU kernel's fault shows at the first synchronisation: in the error's copy)
                got = fn()
                row.update(error=relative_error(got, want[name]),
                           layout=name == 'weight grad' or got.is_contiguous(memory_format=torch.channels_last))
            except Exception as exc:
                row.update(error=None, layout=False, raised=one_line(exc), passed=False)
                yield row
                release(device)
                continue
            row['passed'] = row['error'] <= limit and row['layout']
            yield row


def passing_configs(checks: Sequence[Dict[str, Any]]) -> Dict[str, List[Tuple[int, ...]]]:
    """The block shapes whose every check passed, per kernel: ``'forward'``
    (forward and input gradient share it) and ``'weight grad'``. Only these
    are timed."""
    def good(kernel: str, configs: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
        mine = [c for c in checks if (c['direction'] == 'weight grad') == (kernel == 'weight grad')]
        return [tuple(cf) for cf in configs if any(tuple(c['config']) == tuple(cf) for c in mine)
                and all(c['passed'] for c in mine if tuple(c['config']) == tuple(cf))]

    return {'forward': good('forward', FORWARD_CONFIGS), 'weight grad': good('weight grad', WGRAD_CONFIGS)}


# ---------------------------------------------------------------------------- offline
def hopper_resources(dtype: str = 'bf16') -> List[Dict[str, Any]]:
    """Compile every kernel variant the probe times for an H100/H200 (sm_90)
    without a GPU, with the ptxas and cuobjdump that Triton ships, and read
    each one's registers, local memory (spills) and shared memory: the
    compiler's report, which costs no GPU time. Needs a Triton that is not
    interpreting.

    Each variant is compiled as a launch specialises it: Triton marks a
    pointer argument 16-byte aligned (as PyTorch's allocations are) and an
    integer argument divisible by 16 where it is; the launcher passes
    ``C_DIV``, the power of two up to 16 that divides the channel count. So
    each variant is compiled twice: for ``C`` divisible by 16 (``c_div`` 16:
    Conv2Former-T's stages 2-4 and every 4C layer, all of ConvNeXt-T's) and
    for 72 channels (``c_div`` 8: Conv2Former-T's first stage).
    """
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cuobjdump = osp.join(osp.dirname(dw.triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    data = '*' + {'bf16': 'bf16', 'fp16': 'fp16', 'fp32': 'fp32'}[dtype]
    shapes = dict(H='i32', W='i32', C='i32')
    variants = []
    for k in sorted({k for _, k, _ in LAYERS}):
        for bh, bw, bc, warps in FORWARD_CONFIGS:
            sig = dict(x_ptr=data, w_ptr=data, b_ptr=data, y_ptr=data, **shapes, K='constexpr',
                       HAS_BIAS='constexpr', C_DIV='constexpr', BLOCK_H='constexpr', BLOCK_W='constexpr',
                       BLOCK_C='constexpr')
            variants.append((dw._forward_kernel, sig,
                             dict(K=k, HAS_BIAS=True, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc), warps))
        for bw, bc, warps in WGRAD_CONFIGS:
            sig = dict(x_ptr=data, dy_ptr=data, dw_ptr='*fp32', **shapes, ROWS='i32', ROWS_PER_PROGRAM='i32',
                       K='constexpr', C_DIV='constexpr', BLOCK_T='constexpr', BLOCK_W='constexpr',
                       BLOCK_C='constexpr')
            variants.append((dw._weight_grad_kernel, sig,
                             dict(K=k, BLOCK_T=dw._tap_block(k), BLOCK_W=bw, BLOCK_C=bc), warps))
    results = []
    for (fn, sig, constants, warps), c_div in itertools.product(variants, (16, dw._c_div(72))):
        divisible = {(i,): [['tt.divisibility', 16]] for i, name in enumerate(sig)
                     if name.endswith('_ptr') or (c_div == 16 and name == 'C')}
        constants = dict(constants, C_DIV=c_div)
        compiled = dw.triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=divisible),
                                     target=GPUTarget('cuda', 90, 32), options=dict(num_warps=warps))
        with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
            f.write(compiled.asm['cubin'])
            f.flush()
            usage = subprocess.run([cuobjdump, '-res-usage', f.name], capture_output=True, text=True,
                                   check=True).stdout
        fields = dict(item.split(':') for item in usage.split('Function', 1)[1].split(':', 1)[1].split()
                      if item.count(':') == 1)
        # The widest global load, in bytes (e.g. ld.global.v2.b32: 8): whether channels load as vectors.
        widest = max((int(v or 1) * int(bits) // 8
                      for v, bits in re.findall(r'ld\.global[^\s;]*?(?:\.v(\d))?\.[bfsu](\d+)\b',
                                                compiled.asm['ptx'])), default=0)
        # The block: output rows (forward) or kernel taps (weight gradient) x pixels x channels.
        block = (constants.get('BLOCK_H', constants.get('BLOCK_T')), constants['BLOCK_W'], constants['BLOCK_C'])
        results.append(dict(kernel=fn.__name__.strip('_'), K=constants['K'], block=block, warps=warps, c_div=c_div,
                            registers=int(fields['REG']), local_bytes=int(fields['LOCAL']),
                            stack_bytes=int(fields['STACK']), shared_bytes=int(fields['SHARED']),
                            widest_load_bytes=widest))
    return results


# ---------------------------------------------------------------------------- timing
#: Bytes written between timed calls on a GPU, so that each call starts with
#: a cold L2 cache (as ``triton.testing.do_bench`` does): the floors count
#: device-memory bytes, and a late stage's data (a few MB at either shape)
#: would otherwise be read from the 50 MB L2 of an H100 or H200.
FLUSH_BYTES = 256 * 2 ** 20


def time_ms(fn: Callable[[], Any], device: str, repeats: int = 20, cold: bool = True) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, each call after
    an L2 flush unless ``cold`` is False), after warm-up."""
    for _ in range(min(3, repeats)):
        fn()
    if device == 'cpu':
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if cold else None
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()  # before the start event: not timed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


# ---------------------------------------------------------------------------- ceilings and floors
#: Datasheet leads for ``--floors`` (device-memory GB/s, fp32 CUDA-core
#: TFLOP/s); a run on a GPU measures its own (:func:`measure_ceilings`).
DATASHEETS = {'H100-SXM': (3350.0, 67.0), 'H200': (4800.0, 67.0)}


def measure_ceilings(device: str, tiny: bool = False) -> Dict[str, float]:
    """This machine's ceilings, measured: a device-to-device copy (bytes read
    plus bytes written per second), an fp32 matrix product with TF32 off
    (cuBLAS on the CUDA cores, the units on which an fp32-accumulating
    depthwise kernel does its multiply-adds) and, for reference, a bf16 one
    (the tensor cores, where the blocks' 1x1 convolutions run). ``tiny``:
    small sizes, the code path only."""
    elements, side = (2 ** 18, 128) if tiny else (2 ** 28, 8192)  # fp32: 1 GiB to copy; 8192^3 products
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, 10, cold=False)
    del src, dst
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')  # no TF32: IEEE fp32 on the CUDA cores
    try:
        a, b = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
        fp32_ms = time_ms(lambda: a @ b, device, 10, cold=False)
        a, b = a.bfloat16(), b.bfloat16()
        bf16_ms = time_ms(lambda: a @ b, device, 10, cold=False)
    finally:
        torch.set_float32_matmul_precision(precision)
    flop = 2 * side ** 3
    return dict(copy_gbps=2 * 4 * elements / copy_ms / 1e6, fp32_tflops=flop / fp32_ms / 1e9,
                bf16_tflops=flop / bf16_ms / 1e9)


def floor_ms(row: Dict[str, Any], ceilings: Dict[str, float], itemsize: int) -> Tuple[float, str]:
    """One direction's floor for this layer, the same for all three: the
    larger of its fewest bytes (two activation-sized tensors and the kernel,
    each read or written once) over the copy rate, and its multiply-adds over
    the fp32 CUDA-core rate; and which of the two it is ('memory' or
    'arithmetic')."""
    b, c, h, w = row['shape']
    memory = itemsize * (2 * b * c * h * w + c * row['kernel'] ** 2) / ceilings['copy_gbps'] / 1e6
    arithmetic = row['gflop'] / ceilings['fp32_tflops']
    return (memory, 'memory') if memory >= arithmetic else (arithmetic, 'arithmetic')


def layers(tiny: bool) -> Iterator[Tuple[str, List[Dict[str, Any]]]]:
    """Per model, kernel and batch shape of :data:`LAYERS` and :data:`SHAPES`
    (``tiny``: :data:`TINY_LAYERS` and :data:`TINY_SHAPES`): its name and one
    row per stage."""
    for model, k, stages in (TINY_LAYERS if tiny else LAYERS):
        for batch, side in (TINY_SHAPES if tiny else SHAPES):
            key = f'{model} {k}x{k}, batch {batch} at {side}x{side}'
            rows = []
            for s, (c, blocks) in enumerate(stages):
                hw = side // 2 ** (s + 2)
                rows.append(dict(layer=key, stage=s + 1, shape=[batch, c, hw, hw], kernel=k, blocks=blocks,
                                 gflop=2 * k * k * batch * c * hw * hw / 1e9))
            yield key, rows


def predicted_floors(ceilings: Dict[str, float], itemsize: int = 2, tiny: bool = False) -> Dict[str, float]:
    """Per model and batch shape, the milliseconds a training step must spend
    in depthwise convolutions (forward and both gradients of every block) at
    these ceilings: the prediction a run's sums are measured against."""
    return {key: sum(3 * row['blocks'] * floor_ms(row, ceilings, itemsize)[0] for row in rows)
            for key, rows in layers(tiny)}


def time_direction(times: Dict[str, Any], impl: str, direction: str, fn: Callable[[], Any], device: str,
                   repeats: int, config: Optional[Sequence[int]] = None) -> Optional[float]:
    """Milliseconds of one direction of one implementation, or None where it
    raised: then the error (with the block shape, for a Triton kernel) is
    printed at once and listed in ``times['raised']``, and the GPU is asked
    whether it still answers (:func:`release` raises :class:`DeviceLost` if
    not), so that the other directions and implementations are still timed."""
    try:
        return time_ms(fn, device, repeats)
    except Exception as exc:
        entry = dict(direction=direction, error=one_line(exc))
        if config is not None:
            entry['config'] = tuple(config)
        times.setdefault('raised', []).append(entry)
        print(f'    ! {impl} {direction}{"" if config is None else f" {tuple(config)}"}: raised '
              f'{entry["error"]}', flush=True)
        release(device)
        return None


def time_layer(n: int, c: int, side: int, k: int, device: str, dtype: torch.dtype,
               configs: Optional[Dict[str, List[Tuple[int, ...]]]], repeats: int = 20,
               out: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """``{implementation: {direction: ms}}`` for one layer shape, filled into
    ``out`` (returned) as it is measured; the Triton kernels in ``configs``
    (:func:`passing_configs`; None: not timed). A direction that raises (in
    the Triton kernels, a block shape) is listed under the implementation's
    ``'raised'`` (:func:`time_direction`) and the rest are still timed."""
    out = {} if out is None else out
    x = torch.randn(n, c, side, side, device=device, dtype=dtype)
    weight = torch.randn(c, 1, k, k, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    for label, layout in (('cuDNN, channels-last', torch.channels_last),
                          ('PyTorch, NCHW', torch.contiguous_format)):
        xl, dyl = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
        times = out[label] = {}
        for d, f in torch_directions(xl, weight).items():
            ms = time_direction(times, label, d, lambda f=f: f(dyl), device, repeats)
            if ms is not None:
                times[d] = ms
    if configs and any(configs.values()):
        xl, dyl = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        best: Dict[str, Any] = {}
        triton_times: Dict[str, Any] = {'configs': {}, 'raised': []}
        out['Triton, channels-last'] = triton_times
        runs = [(d, config, fn) for config in configs['forward']
                for d, fn in (('forward', lambda cf=config: triton_forward(xl, weight, cf)),
                              ('input grad', lambda cf=config: triton_input_grad(dyl, weight, cf)))]
        runs += [('weight grad', config, lambda cf=config: triton_weight_grad(xl, dyl, k, cf))
                 for config in configs['weight grad']]
        for d, config, fn in runs:  # one block shape that fails at this size leaves the others' times
            ms = time_direction(triton_times, 'Triton, channels-last', d, fn, device, repeats, config)
            if ms is not None and ms < best.get(d, (float('inf'),))[0]:
                best[d] = (ms, config)
                triton_times[d], triton_times['configs'][d] = ms, config
    return out


def probe(device: str, dtype: torch.dtype, budget: float, tiny: bool = False,
          configs: Optional[Dict[str, List[Tuple[int, ...]]]] = None, out: Optional[Dict[str, Any]] = None,
          save: Callable[[], None] = lambda: None, ceilings: Optional[Dict[str, float]] = None
          ) -> Dict[str, Any]:
    """Every layer shape of :func:`layers` (``tiny``: the code paths only, one
    timed call); the Triton kernels in ``configs`` (:func:`passing_configs`)
    too. With ``ceilings`` (:func:`measure_ceilings`), each layer gets its
    floor (:func:`floor_ms`) and each model its floor sum, in
    ``floor_totals``. A per-model sum counts an implementation only where it
    timed every direction of every layer; where a layer raised or was
    skipped for the budget, the model is listed in ``incomplete``. If the GPU
    stops answering, the layers timed so far are returned with
    ``device_lost``. Rows, sums and ``incomplete`` go into ``out``
    (returned); ``save`` is called after each layer."""
    start, rows, totals, incomplete = time.perf_counter(), [], {}, set()
    itemsize = torch.empty((), dtype=dtype).element_size()
    result = {} if out is None else out
    result.update(rows=rows, totals=totals, incomplete=[])
    if ceilings:
        result.update(ceilings=ceilings, floor_totals=predicted_floors(ceilings, itemsize, tiny))
    finished = set()
    configs = configs if dw.AVAILABLE else None
    directions = {'forward', 'input grad', 'weight grad'}
    try:
        for key, layer_rows in layers(tiny):
            for row in layer_rows:
                if time.perf_counter() - start > budget:
                    rows.append(dict(layer=key, stage=row['stage'], skipped=f'over the {budget:.0f} s budget'))
                    incomplete.add(key)
                    continue
                rows.append(row)
                if ceilings:
                    row['floor_ms'], row['bound'] = floor_ms(row, ceilings, itemsize)
                batch, c, hw, _ = row['shape']
                try:
                    time_layer(batch, c, hw, row['kernel'], device, dtype, configs, 1 if tiny else 20,
                               out=row.setdefault('times', {}))
                except Exception as exc:  # e.g. out of memory: the other layers still count
                    row['raised'] = one_line(exc)
                    print(f'{key:<44} stage {row["stage"]}: raised {row["raised"]}', flush=True)
                    incomplete.add(key)
                    result['incomplete'] = sorted(incomplete)
                    save()
                    release(device)
                    continue
                print_row(row)
                for impl, t in row['times'].items():
                    total = totals.setdefault(key, {}).setdefault(impl, 0.0)
                    totals[key][impl] = total + row['blocks'] * sum(t[d] for d in directions) \
                        if total is not None and directions <= set(t) else None
                save()
            finished.add(key)
            if key in totals or key in incomplete:
                floor = result.get('floor_totals', {}).get(key)
                print(f'  {key}: all blocks, forward + both gradients: ' + ', '.join(
                    f'{impl} {ms:.2f} ms' if ms is not None else f'{impl} (not every direction)'
                    for impl, ms in totals.get(key, {}).items())
                    + ('' if floor is None else f'; floor {floor:.2f} ms')
                    + (' (a layer raised or was skipped: sums incomplete)' if key in incomplete else ''),
                    flush=True)
    except DeviceLost as exc:
        result['device_lost'] = str(exc)
        print(f'# the GPU stopped answering ({exc}): no more timings', flush=True)
        incomplete |= {key for key, _ in layers(tiny)} - finished
    result['incomplete'] = sorted(incomplete)
    return result


def print_row(row: Dict[str, Any]) -> None:
    b, c, h, w = row['shape']
    floor = row.get('floor_ms')
    print(f'{row["layer"]:<44} stage {row["stage"]} [{b}, {c}, {h}, {w}] x{row["blocks"]}'
          + ('' if floor is None else f', floor {floor:.3f} ms per direction ({row["bound"]})'), flush=True)
    for impl, t in row['times'].items():
        cells = '  '.join(f'{d} {t[d]:7.3f} ms ({row["gflop"] / t[d]:6.1f} TFLOP/s'
                          + ('' if floor is None else f', {t[d] / floor:5.1f}x floor') + ')'
                          for d in ('forward', 'input grad', 'weight grad') if d in t)
        print(f'    {impl:<22} {cells}', flush=True)
        for r in t.get('raised', []):
            config = f' {tuple(r["config"])}' if 'config' in r else ''
            print(f'    {impl:<22} {r["direction"]}{config}: raised {r["error"]}', flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='cuda (default), or cpu: check the Triton kernels '
                        'under TRITON_INTERPRET=1')
    parser.add_argument('--tiny', action='store_true', help='time every path once at tiny shapes (with '
                        '--device cpu: checks that the timing code runs)')
    parser.add_argument('--dtype', choices=['bf16', 'fp32'], default='bf16')
    parser.add_argument('--budget', type=float, default=120,
                        help='seconds for the checks and timings; layers past it are skipped (default 120)')
    parser.add_argument('--resources', action='store_true',
                        help='no GPU needed: compile every Triton kernel variant for sm_90 (H100/H200) and '
                             'print its registers, spills (local memory) and shared memory, then stop')
    parser.add_argument('--floors', metavar='GPU|GBPS,TFLOPS',
                        help='no GPU needed: print the floors of the layers and the per-model sums (bf16) at a '
                             f'GPU\'s datasheet ceilings ({", ".join(DATASHEETS)}) or at the given device-memory '
                             'GB/s and fp32 TFLOP/s, then stop')
    parser.add_argument('--json', metavar='PATH', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.floors:
        try:
            bandwidth, rate = DATASHEETS[args.floors] if args.floors in DATASHEETS else \
                (float(v) for v in args.floors.split(','))
            if not (bandwidth > 0 and rate > 0):
                raise ValueError
        except ValueError:
            parser.error(f'--floors {args.floors}: give one of {", ".join(DATASHEETS)} or two numbers, '
                         'GB/s and TFLOP/s, e.g. --floors 3350,67')
        return print_floors(dict(copy_gbps=bandwidth, fp32_tflops=rate), args.floors, args.json)
    if args.resources:
        if not dw.AVAILABLE or dw.INTERPRETED:
            parser.error('--resources needs Triton (and torch >= 2.4), without TRITON_INTERPRET=1')
        rows = hopper_resources(args.dtype)
        for r in rows:
            rows_or_taps = 'rows' if r['kernel'] == 'forward_kernel' else 'taps'
            print(f'{r["kernel"]:<20} K={r["K"]:<3} block {r["block"][0]:>2} {rows_or_taps} x {r["block"][1]:>2} x '
                  f'{r["block"][2]:<3} {"C = 16n" if r["c_div"] == 16 else "C = 72  "} '
                  f'{r["warps"]} warps: {r["registers"]:3d} registers, {r["local_bytes"]} B local (spills), '
                  f'{r["shared_bytes"]} B shared, loads up to {r["widest_load_bytes"]} B', flush=True)
        save_results(dict(triton=dw.triton.__version__, dtype=args.dtype, target='sm_90', kernels=rows), args.json)
        return dict(failed=0, kernels=rows)
    cpu = args.device == 'cpu'
    if cpu and not dw.INTERPRETED and dw.AVAILABLE:
        parser.error('on a CPU the Triton kernels run under the interpreter: set TRITON_INTERPRET=1')
    if not cpu and not torch.cuda.is_available():
        parser.error('no CUDA device here; use --device cpu with TRITON_INTERPRET=1 to check the kernels')
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    start = time.perf_counter()  # the checks' compilations count against the budget too
    result: Dict[str, Any] = dict(device=torch.cuda.get_device_name() if not cpu else 'cpu',
                                  torch=torch.__version__, triton=getattr(dw.triton, '__version__', None),
                                  cudnn=torch.backends.cudnn.version(), dtype=args.dtype, checks=[])
    print(f'# {result["device"]}, torch {result["torch"]}, cuDNN {result["cudnn"]}, '
          f'Triton {result["triton"]}, {args.dtype}', flush=True)
    if not dw.AVAILABLE:
        print('# no Triton (or torch < 2.4): cuDNN and PyTorch only', flush=True)
    else:
        shapes = [(2, 40, 9, 19, 5), (1, 24, 7, 7, 3)] if cpu else \
            [(4, 72, 56, 56, 11), (2, 288, 14, 14, 3), (2, 96, 28, 28, 7), (1, 576, 7, 7, 11)]
        try:
            # fp32 (tight: 1e-5) for the package's block shapes; the timed
            # dtype for every block shape that is timed. Each (dtype, block
            # shape) is a compilation on a GPU, and they count against --budget.
            for dt in ([torch.float32, dtype] if dtype != torch.float32 else [dtype]):
                for check in check_triton(args.device, dt, shapes, every_config=dt == dtype):
                    check['dtype'] = str(dt)
                    result['checks'].append(check)
                    outcome = f'raised {check["raised"]}' if 'raised' in check else \
                        f'relative error {check["error"]:.1e}'
                    print(f'  [{"ok" if check["passed"] else "FAILED"}] Triton {check["direction"]}, '
                          f'{check["dtype"]}, shape {check["shape"]}, config {check["config"]}: {outcome}',
                          flush=True)
        except DeviceLost as exc:
            result['device_lost'] = str(exc)
            print(f'# the GPU stopped answering ({exc}): no timings', flush=True)
        save_results(result, args.json)
    failed = [c for c in result['checks'] if not c['passed']]
    if (not cpu or args.tiny) and 'device_lost' not in result:
        ceilings = ceilings_or_none(args.device, cpu, result)  # may find the GPU lost
    if (not cpu or args.tiny) and 'device_lost' not in result:
        torch.backends.cudnn.benchmark = True
        configs = passing_configs(result['checks'])
        if failed:  # a block shape that failed a check is not timed
            print(f'# Triton checks failed: timing only the block shapes that passed, {configs}', flush=True)
        left = args.budget - (time.perf_counter() - start)
        probe(args.device, dtype, left, args.tiny, configs, out=result,
              save=lambda: save_results(result, args.json), ceilings=ceilings)
    result['failed'] = failures(result)
    result['triton_default_ok'] = triton_default_ok(result)
    save_results(result, args.json)
    return result


def ceilings_or_none(device: str, tiny: bool, result: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """:func:`measure_ceilings`, printed; None where they raised (then the
    layers are timed without floors), with ``device_lost`` set in ``result``
    if the GPU stopped answering."""
    try:
        ceilings = measure_ceilings(device, tiny)
    except Exception as exc:
        result['ceilings_raised'] = one_line(exc)
        print(f'# the ceilings raised {result["ceilings_raised"]}: no floors', flush=True)
        try:
            release(device)
        except DeviceLost as lost:
            result['device_lost'] = str(lost)
            print(f'# the GPU stopped answering ({lost}): no timings', flush=True)
        return None
    print(f'# ceilings measured here{" (tiny sizes: code path only)" if tiny else ""}: copy '
          f'{ceilings["copy_gbps"]:.0f} GB/s, fp32 matrix product (no TF32) {ceilings["fp32_tflops"]:.1f} '
          f'TFLOP/s, bf16 {ceilings["bf16_tflops"]:.0f} TFLOP/s', flush=True)
    return ceilings


def print_floors(ceilings: Dict[str, float], label: str, path: Optional[str]) -> Dict[str, Any]:
    """``--floors``: each layer's floor and each model's sum at ``ceilings``."""
    print(f'# floors at {label}: {ceilings["copy_gbps"]:.0f} GB/s, {ceilings["fp32_tflops"]:.1f} fp32 TFLOP/s; '
          'bf16 data; per direction, and per training step (forward + both gradients, every block)')
    rows = []
    for key, layer_rows in layers(False):
        for row in layer_rows:
            row['floor_ms'], row['bound'] = floor_ms(row, ceilings, 2)
            rows.append(row)
            print(f'{key:<44} stage {row["stage"]} {row["shape"]} x{row["blocks"]}: '
                  f'{row["floor_ms"]:.3f} ms ({row["bound"]})')
    totals = predicted_floors(ceilings)
    for key, ms in totals.items():
        print(f'  {key}: {ms:.2f} ms per training step')
    result = dict(floors_at=label, ceilings=ceilings, rows=rows, floor_totals=totals, failed=0)
    save_results(result, path)
    return result


def failures(result: Dict[str, Any]) -> int:
    """How many things failed: checks, layers that raised, directions that
    raised (per implementation and block shape), and a lost GPU."""
    rows = result.get('rows', [])
    return sum(not c['passed'] for c in result.get('checks', [])) + sum('raised' in r for r in rows) + sum(
        len(t.get('raised', [])) for r in rows for t in r.get('times', {}).values()) + ('device_lost' in result)


def triton_default_ok(result: Dict[str, Any]) -> bool:
    """Whether the package's own block shapes (``FORWARD_CONFIG``,
    ``WEIGHT_GRAD_CONFIG``, the ones ``depthwise_impl='triton'`` runs)
    passed every check and raised at no layer, with the GPU still answering.
    ``gpu_session.sh`` times the Triton variant in the benchmark only then:
    a kernel that faults may leave its process's GPU context unusable."""
    if not dw.AVAILABLE or 'device_lost' in result:
        return False
    good = passing_configs(result['checks'])
    defaults = {'forward': tuple(dw.FORWARD_CONFIG), 'weight grad': tuple(dw.WEIGHT_GRAD_CONFIG)}
    if any(default not in good[kernel] for kernel, default in defaults.items()):
        return False
    kernel = {'forward': 'forward', 'input grad': 'forward', 'weight grad': 'weight grad'}  # direction -> kernel
    for row in result.get('rows', []):
        if 'raised' in row:
            return False
        raised = row.get('times', {}).get('Triton, channels-last', {}).get('raised', [])
        if any(tuple(r['config']) == defaults[kernel[r['direction']]] for r in raised):
            return False
    return True


if __name__ == '__main__':
    sys.exit(1 if main()['failed'] else 0)
