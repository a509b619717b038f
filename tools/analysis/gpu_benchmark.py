"""Conv2Former-T against ConvNeXt-T on one GPU: one command, one table, under 8 minutes.

    python tools/analysis/gpu_benchmark.py --json gpu_benchmark.json
    python tools/analysis/gpu_benchmark.py --device cpu --tiny   # every path, tiny shapes, on a CPU

It needs torch and mmengine (``import mmconv2former``) and, for the peer,
mmpretrain's ConvNeXt or timm's ``convnext_tiny`` (the table says which). For
an offline GPU node, ``tools/analysis/make_wheelhouse.sh`` makes a folder of
wheels on a connected machine; ``docs/gpu_benchmark.md`` gives the steps.

What it runs, in this order, printing each result as it comes:

1. Correctness: gradients of ``recompute=True``, ``recompute='modulation'``,
   ``with_cp=True`` and ``depthwise_impl='triton'`` (where its kernels run) against
   ``recompute=False``'s under fp32, bf16 and fp16 autocast; every block's
   output a contiguous ``(B, H, W, C)`` tensor and every feature map a
   contiguous ``(B, C, H, W)`` one; a few fp16 training steps with a
   GradScaler without a NaN.
2. Where the time goes: one profiled step of each model (bf16 training at
   both shapes, bf16 inference at 224), its device time split by operator
   kind and pass (``mmconv2former/engine/breakdown.py``), and the longest
   kernels.
3. Speed and memory, every case on channels-last input: training steps
   (forward, backward, AdamW; fp16 with a GradScaler as mmengine's
   ``AmpOptimWrapper`` does) of Conv2Former-T with ``recompute`` on
   (``True``, the default, and ``'modulation'``, which stores less) and off,
   and of ConvNeXt-T, bf16 and fp16 autocast, batch 64 at 224x224 and batch 4
   at 1024x1024; inference (bf16 autocast) of Conv2Former-T, its
   ``switch_to_deploy()`` form and ConvNeXt-T, batch 64 at 224x224 and batch 1
   at 1024x1024; all eager, then all with ``torch.compile``. In eager
   settings, Conv2Former-T with ``depthwise_impl='triton'`` too, where its
   kernels run. The models of one setting are timed interleaved
   (``mmconv2former.engine.profiling``).

A time guard keeps the whole run within ``--budget`` seconds: a setting whose
estimated cost (compilation included) would overrun it is skipped with a note.
Compiled settings come last, in the order the targets need them (bf16
training at both shapes, bf16 inference, fp16 training). ``--quick`` times
fewer settings.

A part that raises (a check, a model's profiled step, a model in a setting:
a kernel that does not compile on this GPU, an out-of-memory error) is
reported with its error and the run goes on; the results file is rewritten
after every part and lists every failure; the exit status is 1 if anything
failed.
"""
import argparse
import copy
import math
import os.path as osp
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # run from a checkout

from mmconv2former.engine.profiling import (MEMORY_PEERS, Case, DeviceLost, TrainStep, autocast,  # noqa: E402
                                            build_conv2former, build_models, convnext_label, describe,
                                            gradients, machine, make_step, mean_square_of_outputs,
                                            one_line, paired_ratio, peak_memory, release, save_results,
                                            summarise, synchronize, time_interleaved)
from mmconv2former.engine.breakdown import step_breakdown  # noqa: E402
from mmconv2former.models import Conv2FormerBlock  # noqa: E402
from mmconv2former.ops import depthwise_conv  # noqa: E402

#: ``--tiny``: one block per stage, a kernel above 3x3 (and a ConvNeXt of the
#: same widths and depths); small enough to compile in seconds.
TINY_ARCH = dict(channels=[16, 32, 48, 64], depths=[1, 1, 1, 1], kernel_size=5)

#: Largest accepted ``max |g - g_ref| / |g_ref|`` over parameter tensors,
#: against recompute=False's gradients. Recomputation runs the same kernels on
#: the same inputs, so the gradients agree to rounding; a wrong or missing
#: gradient term shows as an error of order 1.
GRAD_TOLERANCE = {'fp32': 1e-4, 'bf16': 1e-2, 'fp16': 1e-2}
#: For the Triton depthwise operator against cuDNN (TF32 off), per parameter
#: tensor ``|g - g_ref| / max(|g_ref|, 1e-3 |all g_ref|)``: other kernels sum
#: in another order, which shows, relatively, in the tensors whose gradients
#: are tiny at initialisation (hence the floor), and under autocast their
#: bf16/fp16 outputs round differently. (Measured on a CPU, tiny arch: PyTorch's
#: own fp32 gradients are up to 2e-3 off fp64's by this measure, in the stem.)
#: A wrong term is still of order 1.
TRITON_TOLERANCE = {'fp32': 1e-2, 'bf16': 5e-2, 'fp16': 5e-2}


@dataclass
class Setting:
    """One group of cases timed together."""
    mode: str        # 'train' or 'inference'
    dtype: str       # 'bf16' or 'fp16'
    batch: int
    side: int
    compiled: bool

    def __str__(self) -> str:
        return (f'{self.mode} {self.dtype}, batch {self.batch} at {self.side}x{self.side}, '
                f'{"compiled" if self.compiled else "eager"}')


def settings(tiny: bool, quick: bool, with_compile: bool) -> List[Setting]:
    """The settings in the order they run: eager before compiled, 224 before
    1024. Compiled settings, which the time guard may cut, go by what the
    targets need: bf16 training at both shapes, then bf16 inference, then
    fp16 training (fp16 differs from bf16 only in the GradScaler, which runs
    outside the compiled model). ``quick`` compiles at 224 only; ``tiny``
    runs every code path once."""
    shapes = [((2, 64), (2, 64))] if tiny else [((64, 224), (64, 224)), ((4, 1024), (1, 1024))]
    out = []
    for train, infer in shapes:  # eager: each shape's settings together
        out += [Setting('train', d, *train, False) for d in ('bf16', 'fp16')]
        out.append(Setting('inference', 'bf16', *infer, False))
    if with_compile:
        shapes = shapes[:1] if quick else shapes
        out += [Setting('train', 'bf16', *train, True) for train, _ in shapes]
        out += [Setting('inference', 'bf16', *infer, True) for _, infer in shapes]
        if not (quick or tiny):
            out += [Setting('train', 'fp16', *train, True) for train, _ in shapes]
    return out


# ---------------------------------------------------------------------------- models
def models_for(setting: Setting, arch: Union[str, dict], convnext_arch: Union[str, dict],
               convnext: str, triton: bool = False) -> List[Tuple[str, str, nn.Module]]:
    """``(key, label, model)`` of one setting (:func:`build_models`); the
    ConvNeXt last. ``triton``: also Conv2Former with the Triton depthwise
    operator, in eager settings (it is one operator; compiled graphs call it
    as they call cuDNN's)."""
    keys = ['conv2former'] + (['recompute-off', 'recompute-modulation'] if setting.mode == 'train' else ['deploy'])
    keys += ['triton-depthwise'] if triton and not setting.compiled else []
    return build_models(keys + ['convnext'], arch, convnext_arch, convnext)


def on_device(model: nn.Module, device: str, compiled: bool, backend: str) -> nn.Module:
    model = model.to(device=device, memory_format=torch.channels_last)
    return torch.compile(model, backend=backend, dynamic=False) if compiled else model


# ---------------------------------------------------------------------------- failures
def failure(exc: Exception, what: str, **fields) -> Dict[str, Any]:
    """What a part that raised leaves in the results (the error in one line
    and the traceback's end), printed at once. On a first run on a new GPU
    one failing part (a kernel that does not compile, an out-of-memory error)
    must not cost the rest of the run; the caller stores this record where
    the results are kept, then calls :func:`release`, which frees what the
    part left or raises :class:`DeviceLost` if the GPU stopped answering."""
    record = dict(fields, error=one_line(exc), traceback=traceback.format_exc()[-3000:])
    print(f'  ! {what}: raised {record["error"]}', flush=True)
    return record


# ---------------------------------------------------------------------------- correctness
def check_gradients(arch: Union[str, dict], x: torch.Tensor, triton: bool = False,
                    out: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Gradients of every memory policy (and, with ``triton``, of the Triton
    depthwise operator) against ``recompute=False``'s, under each autocast
    dtype, appended to ``out`` (returned) as they come. Layer scales are set
    to 1 so that every branch of every block counts in the gradient (at their
    1e-6 init a wrong branch would hardly show)."""
    device = x.device
    reference = build_conv2former(arch, recompute=False).to(device)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if 'layer_scale' in name:
                p.fill_(1.0)
    models = {}
    # The default and every other memory policy but the reference itself.
    policies = [dict(recompute=True)] + [kw for kw in MEMORY_PEERS.values() if kw != dict(recompute=False)]
    variants = [(', '.join(f'{k}={v!r}' for k, v in kw.items()), kw) for kw in policies]
    variants += [("depthwise_impl='triton'", dict(depthwise_impl='triton'))] if triton else []
    for label, kwargs in variants:
        models[label] = build_conv2former(arch, **kwargs).to(device)
        models[label].load_state_dict(reference.state_dict())
    results = [] if out is None else out
    for dtype in ('fp32', 'bf16', 'fp16'):
        expected = gradients(reference, x, dtype, loss_fn=mean_square_of_outputs)
        for label, model in models.items():
            triton_kernels = 'triton' in label
            limit, what = ((TRITON_TOLERANCE[dtype], 'worst parameter, floored') if triton_kernels
                           else (GRAD_TOLERANCE[dtype], 'worst parameter'))
            check = f'gradients {label} vs recompute=False, {dtype} ({what})'
            try:  # (a GPU kernel's fault shows at the first synchronisation: in here too)
                got = gradients(model, x, dtype, loss_fn=mean_square_of_outputs)
                finite = all(torch.isfinite(g).all() for g in got.values())
                missing = sorted(set(expected) - set(got))
                names = [n for n in expected if n in got]
                if triton_kernels:  # other kernels: each tensor, against a floor of the whole gradient's size
                    floor = 1e-3 * torch.cat([expected[n].flatten() for n in names]).norm()
                    error = max(((got[n] - expected[n]).norm() / torch.maximum(expected[n].norm(), floor)).item()
                                for n in names)
                else:  # the same kernels: every parameter tensor on its own
                    error = max(((got[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-30)).item()
                                for n in names)
            except Exception as exc:  # e.g. a Triton kernel that does not compile here
                results.append(failure(exc, check, check=check, passed=False))
                release(x.device)
                continue
            results.append(dict(check=check, value=error, limit=limit,
                                passed=finite and not missing and error <= limit))
    return results


def check_layouts(arch: Union[str, dict], x: torch.Tensor) -> List[Dict[str, Any]]:
    """Every block's output a contiguous (B, H, W, C) tensor and every feature
    map a contiguous (B, C, H, W) one, under bf16 autocast, in training (the
    blocks recomputed) and in eval mode."""
    model = build_conv2former(arch).to(x.device)
    blocks: List[bool] = []
    for module in model.modules():
        if isinstance(module, Conv2FormerBlock):
            dim = module.attn.norm.normalized_shape[0]
            module.register_forward_hook(
                lambda m, i, out, dim=dim: blocks.append(out.is_contiguous() and out.shape[-1] == dim))
    results = []
    for mode in ('train', 'eval'):
        blocks.clear()
        model.train(mode == 'train')
        with autocast(x.device, 'bf16'), torch.set_grad_enabled(mode == 'train'):
            outs = model(x)
        maps = [o.is_contiguous() and o.shape[1] == c for o, c in zip(outs, model.out_channels)]
        results.append(dict(check=f'channels-last contiguous block outputs, {mode}',
                            value=f'{sum(blocks)}/{len(blocks)}', passed=bool(blocks) and all(blocks)))
        results.append(dict(check=f'contiguous NCHW feature maps, {mode}',
                            value=f'{sum(maps)}/{len(maps)}', passed=all(maps)))
    return results


def check_fp16(arch: Union[str, dict], x: torch.Tensor, steps: int = 6) -> Dict[str, Any]:
    """A few fp16 training steps with a GradScaler: every loss and every
    weight finite, and most updates applied (the scaler skips an update
    whose gradients overflowed, halving its scale)."""
    model = build_conv2former(arch).to(device=x.device, memory_format=torch.channels_last)
    step = TrainStep(model, x, 'fp16', lr=1e-3)
    losses, scales = [], [step.scaler.get_scale()]
    for _ in range(steps):
        losses.append(step().item())
        scales.append(step.scaler.get_scale())
    skipped = sum(b < a for a, b in zip(scales, scales[1:]))
    finite = all(math.isfinite(v) for v in losses) and all(torch.isfinite(p).all() for p in model.parameters())
    return dict(check=f'fp16 + GradScaler, {steps} AdamW steps: losses and weights finite',
                value=f'{skipped} skipped, final scale {scales[-1]:g}',
                passed=finite and skipped < steps // 2)


def correctness(arch: Union[str, dict], batch: int, side: int, device: str, triton: bool = False,
                out: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Every check, appended to ``out`` (returned) as it comes."""
    results = [] if out is None else out
    x = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32
    # Deterministic kernels, so that the gradients differ by the policy only;
    # fp32 convolutions in fp32, so that the Triton operator meets cuDNN's numbers.
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = True, False, False
    try:
        for name, check in (('gradients', lambda: check_gradients(arch, x, triton, results)),
                            ('layouts', lambda: results.extend(check_layouts(arch, x)))):
            try:
                check()
            except Exception as exc:
                results.append(failure(exc, f'the {name} checks', check=name, passed=False))
                release(device)
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = saved
    try:
        results.append(check_fp16(arch, x))
    except Exception as exc:
        results.append(failure(exc, 'the fp16 check', check='fp16 + GradScaler', passed=False))
        release(device)
    return results


# ---------------------------------------------------------------------------- profile
def breakdown_settings(tiny: bool) -> List[Setting]:
    """The settings profiled: bf16 training at both shapes, bf16 inference
    at the small one; eager (compiled graphs hide the operators)."""
    if tiny:
        return [Setting('train', 'bf16', 2, 64, False), Setting('inference', 'bf16', 2, 64, False)]
    return [Setting('train', 'bf16', 64, 224, False), Setting('train', 'bf16', 4, 1024, False),
            Setting('inference', 'bf16', 64, 224, False)]


def run_breakdowns(args: argparse.Namespace, limit: float, out: Optional[List[Dict[str, Any]]] = None,
                   done: Callable[[Dict[str, Any]], None] = lambda breakdown: None) -> List[Dict[str, Any]]:
    """One profiled step of each model of each :func:`breakdown_settings`,
    after two warm-up steps, appended to ``out`` (returned) as they come, and
    each setting given to ``done`` once complete; stops once ``limit``
    seconds have passed."""
    start, results = time.perf_counter(), [] if out is None else out
    over = f'over the {limit:.0f} s given to profiles'
    for setting in breakdown_settings(args.tiny):
        if time.perf_counter() - start > limit:
            results.append(dict(setting=str(setting), skipped=over))
            done(results[-1])
            continue
        x = torch.randn(setting.batch, 3, setting.side, setting.side, device=args.device)
        x = x.contiguous(memory_format=torch.channels_last)
        results.append(dict(setting=str(setting), models=[]))
        models = results[-1]['models']
        pending = models_for(setting, args.arch, args.convnext_arch, args.convnext, args.triton)
        while pending:  # one model on the device at a time
            key, label, model = pending.pop(0)
            if time.perf_counter() - start > limit:  # a setting holds up to five models
                models.append(dict(key=key, name=label, skipped=over))
                model = None
                continue
            try:
                step = make_step(on_device(model, args.device, False, args.backend), x,
                                 setting.mode == 'train', setting.dtype)
                for _ in range(2):
                    step()
                models.append(dict(key=key, name=label, **step_breakdown(step, args.device)))
            except Exception as exc:
                models.append(failure(exc, f'profiling {label}, {setting}', key=key, name=label))
            step = model = None
            release(args.device)
        done(results[-1])
    return results


def print_breakdown(result: Dict[str, Any], kernels: int = 8) -> None:
    """One setting: a row per operator kind, a column per model (ms and
    share of the step), then each model's longest kernels."""
    if 'skipped' in result:
        print(f'## {result["setting"]}: skipped, {result["skipped"]}', flush=True)
        return
    for m in result['models']:
        if 'error' in m:
            print(f'## {result["setting"]}: {m["name"]} failed: {m["error"]}', flush=True)
        elif 'skipped' in m:
            print(f'## {result["setting"]}: {m["name"]} not profiled, {m["skipped"]}', flush=True)
    models = [m for m in result['models'] if 'error' not in m and 'skipped' not in m]
    if not models:
        return
    kinds = list(dict.fromkeys(k for m in models for k in m['kinds']))
    print(f'## {result["setting"]}: ' + '  '.join(f'[{i}] {m["name"]}' for i, m in enumerate(models, 1)),
          flush=True)
    print(f'{"kind, pass":<46}' + ''.join(f'{f"[{i}] ms":>11}{"%":>7}' for i in range(1, len(models) + 1)),
          flush=True)
    for kind in kinds + ['total']:
        cells = ''
        for m in models:
            ms = m['total_ms'] if kind == 'total' else m['kinds'].get(kind)
            cells += f'{"-":>11}{"":>7}' if ms is None else f'{ms:11.2f}{100 * ms / max(m["total_ms"], 1e-9):6.1f}%'
        print(f'{kind:<46}{cells}', flush=True)
    for m in models:
        what = 'kernels' if m['device_time'] else 'operators (own CPU time)'
        print(f'  longest {what} of {m["name"]}:', flush=True)
        for k in m['kernels'][:kernels]:
            print(f'    {k["ms"]:9.2f} ms {k["calls"]:5d} calls  {k["kind"][:40]:<40} {k["name"][:90]}', flush=True)


# ---------------------------------------------------------------------------- timing
class Guard:
    """Whether the next setting, or the next compilation, fits in the time
    left, judged from what earlier ones took."""

    #: Seconds assumed for one model's compilation before one has been seen.
    FIRST_COMPILE = {'train': 60.0, 'inference': 30.0}

    def __init__(self, budget: float, start: float) -> None:
        self.deadline = start + budget
        self.compile_s: Dict[str, float] = {}   # mode -> longest first step of a compiled model
        self.step_s: Dict[Tuple[str, int], float] = {}  # (mode, side) -> longest eager step

    def compile_estimate(self, mode: str) -> float:
        return self.compile_s.get(mode, self.FIRST_COMPILE[mode])

    def estimate(self, setting: Setting, cases: int, steps: int) -> float:
        step = self.step_s.get((setting.mode, setting.side), 0.0)
        return cases * ((self.compile_estimate(setting.mode) if setting.compiled else 0.0) + steps * step)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def run_setting(setting: Setting, args: argparse.Namespace, guard: Guard,
                failed: Optional[List[dict]] = None) -> Tuple[List[dict], Optional[str], List[dict]]:
    """Rows of one setting; a note why it was skipped or cut short, or None;
    and ``failed`` (returned), to which each model that raised is appended as
    it fails (:func:`failure`): the others' rows stand.

    A compiled setting needs time for two compilations to start (Conv2Former
    and the ConvNeXt, compiled first); the other models follow while the
    time guard allows, and what was compiled is timed either way."""
    failed = [] if failed is None else failed
    steps = args.warmup + args.repeats + 1
    models = models_for(setting, args.arch, args.convnext_arch, args.convnext, args.triton)
    estimate = guard.estimate(setting, 2 if setting.compiled else len(models), steps)
    if estimate > guard.left():
        return [], f'skipped: needs about {estimate:.0f} s, {max(guard.left(), 0):.0f} s of the budget left', failed
    order = sorted(models, key=lambda m: {'conv2former': 0, 'convnext': 1}.get(m[0], 2)) if setting.compiled \
        else models
    x = torch.randn(setting.batch, 3, setting.side, setting.side, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    cases, first_step, left_out = [], {}, []
    for key, label, model in order:
        if setting.compiled and guard.compile_estimate(setting.mode) > guard.left():
            left_out.append(label)
            continue
        try:
            net = on_device(model, args.device, setting.compiled, args.backend)
            step = make_step(net, x, setting.mode == 'train', setting.dtype)
            start = time.perf_counter()
            step()  # compiles, searches cuDNN algorithms, creates the optimiser state
            synchronize(args.device)
        except Exception as exc:  # a compilation or kernel that fails here, an out-of-memory error
            failed.append(failure(exc, f'{label}, {setting}', setting=str(setting), name=label))
            net = step = model = None
            release(args.device)
            continue
        first_step[label] = time.perf_counter() - start
        if setting.compiled:
            guard.compile_s[setting.mode] = max(guard.compile_s.get(setting.mode, 0.0), first_step[label])
        cases.append(Case(label, step, setting.batch, key))
    note = f'no time to compile {", ".join(left_out)}' if left_out else None
    if not cases:
        return [], note or 'failed: no model ran', failed
    cases.sort(key=lambda c: [m[1] for m in models].index(c.name))  # the table's order
    time_interleaved(cases, args.repeats, args.warmup - 1, 1, args.device)
    base = next((c for c in cases if c.key == 'convnext'), None)
    # Memory on a GPU only: what max_memory_allocated says (on a CPU the
    # profiler's count takes longer than the tiny steps; benchmark.py has it).
    cuda = torch.device(args.device).type == 'cuda'
    rows = []
    for case in cases:
        row = summarise(case)
        ratio = paired_ratio(case, base) if base else None
        row.update(setting=str(setting), speed_vs_convnext=ratio['median'] if ratio else None,
                   speed_vs_convnext_range=[ratio['min'], ratio['max']] if ratio else None,
                   peak_mib=peak_memory(case.step, args.device) / 2 ** 20 if cuda else None,
                   first_step_s=first_step[case.name])
        guard.step_s[(setting.mode, setting.side)] = max(guard.step_s.get((setting.mode, setting.side), 0.0),
                                                          row['ms_per_step'] / 1e3)
        rows.append(row)
    base_mib = next((r['peak_mib'] for r in rows if r['key'] == 'convnext'), None)
    for row in rows:
        row['memory_vs_convnext'] = row['peak_mib'] / base_mib if cuda and base_mib else None
    return rows, note, failed


HEAD = (f'{"setting":<44} {"model":<40} {"img/s":>9} {"(min-max)":>19} {"vs ConvNeXt":>11} '
        f'{"peak MiB":>9} {"vs ConvNeXt":>11} {"1st step s":>10}')


def print_row(row: Dict[str, Any]) -> None:
    def ratio(value: Optional[float]) -> str:
        return f'{"-":>11}' if value is None else f'{value:10.2f}x'

    spread = f'({row["min"]:.1f}-{row["max"]:.1f})'
    memory = f'{row["peak_mib"]:9.1f}' if row['peak_mib'] is not None else f'{"-":>9}'
    print(f'{row["setting"]:<44} {row["name"]:<40} {row["img_per_s"]:9.1f} {spread:>19} '
          f'{ratio(row["speed_vs_convnext"])} {memory} {ratio(row["memory_vs_convnext"])} '
          f'{row["first_step_s"]:10.1f}', flush=True)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='cuda (default), or cpu to check the paths')
    parser.add_argument('--tiny', action='store_true',
                        help='a tiny Conv2Former and ConvNeXt at 64x64, 3 repeats: checks every path in '
                             'seconds (with --device cpu; compiles with the aot_eager backend unless '
                             '--backend is given)')
    parser.add_argument('--quick', action='store_true', help='compiled settings: bf16 at 224 only')
    parser.add_argument('--no-compile', action='store_true', help='eager settings only')
    parser.add_argument('--no-triton', action='store_true',
                        help="leave out Conv2Former-T with depthwise_impl='triton' (included where its "
                             'kernels run: CUDA with Triton, or TRITON_INTERPRET=1)')
    parser.add_argument('--no-profile', action='store_true',
                        help='skip the profiled steps (where the time goes, by operator kind and kernel)')
    parser.add_argument('--backend', help='torch.compile backend (default inductor; aot_eager with --tiny)')
    parser.add_argument('--budget', type=float, default=400,
                        help='seconds the whole run may take; settings that would overrun it are '
                             'skipped with a note (default 400)')
    parser.add_argument('--repeats', type=int, help='timed steps of every case (default 10; 3 with --tiny)')
    parser.add_argument('--warmup', type=int, help='untimed steps of every case first, the compiling '
                        'one included (default 3; 1 with --tiny)')
    parser.add_argument('--convnext', choices=['auto', 'mmpretrain', 'timm'], default='auto',
                        help="whose ConvNeXt-T: mmpretrain's where installed, else timm's (default auto)")
    parser.add_argument('--json', metavar='PATH', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        parser.error('no CUDA device here; use --device cpu (with --tiny) to check the paths')
    args.arch, args.convnext_arch = (TINY_ARCH, {k: TINY_ARCH[k] for k in ('channels', 'depths')}) \
        if args.tiny else ('t', 't')
    args.repeats = args.repeats or (3 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.backend = args.backend or ('aot_eager' if args.tiny else 'inductor')
    args.triton = not args.no_triton and depthwise_conv.runs_here(torch.empty(0, device=args.device))
    if args.warmup < 1 or args.repeats < 1:
        parser.error('--warmup and --repeats must be at least 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    guard = Guard(args.budget, start)
    if torch.device(args.device).type == 'cuda':
        torch.backends.cudnn.benchmark = True
    result: Dict[str, Any] = dict(machine=machine(), settings=copy.deepcopy(
        {k: v for k, v in vars(args).items() if k != 'json'}), correctness=[], breakdowns=[], rows=[], skipped=[],
        notes=[], failed_models=[])
    print(f'# {describe(result["machine"])}', flush=True)
    try:
        peer_label = convnext_label(args.convnext_arch, library=args.convnext)
    except ImportError as exc:
        raise SystemExit(f'gpu_benchmark.py: {exc}') from None
    result['convnext'] = peer_label
    print(f'# peer: {peer_label}; Conv2Former {"tiny " + str(TINY_ARCH) if args.tiny else "T"}; '
          f'channels-last input; {args.repeats} timed steps after {args.warmup} warm-up; '
          f'compile backend {args.backend}; budget {args.budget:.0f} s', flush=True)
    triton_version = getattr(depthwise_conv.triton, '__version__', None)
    print(f"# depthwise_impl='triton': {'timed in eager settings' if args.triton else 'left out'} "
          f'(Triton {triton_version}; kernel blocks {depthwise_conv.FORWARD_CONFIG}, '
          f'{depthwise_conv.WEIGHT_GRAD_CONFIG})', flush=True)
    result['triton'] = dict(included=args.triton, version=triton_version)
    save_results(result, args.json)
    try:
        run_parts(args, guard, result)
    except DeviceLost as exc:  # the results so far stand; nothing more can run on this GPU
        result['device_lost'] = str(exc)
        print(f'# the GPU stopped answering after a failure ({exc}): stopping here', flush=True)
    result['seconds'] = time.perf_counter() - start
    result['failed'] = [c['check'] for c in result['correctness'] if not c['passed']] + [
        f'{b["setting"]}: {m["name"]}' for b in result['breakdowns'] for m in b.get('models', [])
        if 'error' in m] + [f'{f["setting"]}: {f["name"]}' for f in result['failed_models']] + (
        [f'GPU lost: {result["device_lost"]}'] if 'device_lost' in result else [])
    print(f'# {len(result["rows"])} rows, {len(result["skipped"])} settings skipped, '
          f'{sum(not c["passed"] for c in result["correctness"])} correctness checks failed, '
          f'{len(result["failed"])} failures in all, {result["seconds"]:.0f} s', flush=True)
    save_results(result, args.json)
    if args.json:
        print(f'# results: {args.json}', flush=True)
    return result


def run_parts(args: argparse.Namespace, guard: Guard, result: Dict[str, Any]) -> None:
    """Correctness, where the time goes, then speed and memory, into
    ``result`` as they come (saved after each)."""
    side = 64 if args.tiny else 224
    print('# correctness (gradients: |g - g_ref| / |g_ref| of the worst parameter tensor, or of all '
          'parameters as one vector)', flush=True)
    for check in correctness(args.arch, 2, side, args.device, args.triton, out=result['correctness']):
        if 'error' in check:
            value = f'raised {check["error"]}'
        else:
            value = f'{check["value"]:.2e} (limit {check["limit"]:g})' if 'limit' in check else check['value']
        print(f'  [{"ok" if check["passed"] else "FAILED"}] {check["check"]}: {value}', flush=True)
    if args.triton and any('triton' in c['check'] and 'error' in c for c in result['correctness']):
        args.triton = result['triton']['included'] = result['settings']['triton'] = False
        print("# depthwise_impl='triton' raised in the checks: left out of the timings", flush=True)
    save_results(result, args.json)

    if not args.no_profile:
        print('# where the time goes: one step under torch.profiler; each operator counted once, with '
              f'the {"device time of the kernels" if torch.device(args.device).type == "cuda" else "CPU time"} '
              'launched under it (mmconv2former/engine/breakdown.py)', flush=True)

        def done(breakdown: Dict[str, Any]) -> None:
            print_breakdown(breakdown)
            save_results(result, args.json)

        run_breakdowns(args, 0.15 * args.budget, out=result['breakdowns'], done=done)

    print('# speed: img/s median (min-max) of the timed steps; "vs ConvNeXt": paired median ratio; '
          'peak MiB: max_memory_allocated during one step above the weights, optimiser state and '
          'input; 1st step s: the first step (compilation included)', flush=True)
    print(HEAD, flush=True)
    failed = result['failed_models']  # each model that raises is stored there as it fails
    for setting in settings(args.tiny, args.quick, not args.no_compile):
        first = len(failed)
        try:
            rows, note, _ = run_setting(setting, args, guard, failed)
        except Exception as exc:  # in the timed steps or the memory count, e.g. out of memory
            rows, note = [], None
            failed.append(failure(exc, f'timing {setting}', setting=str(setting), name='(timing)'))
        for row in rows:
            print_row(row)
        result['rows'] += rows
        for f in failed[first:]:
            print(f'{f["setting"]:<44} {f["name"]:<40} failed: {f["error"]}', flush=True)
        if note:  # skipped, or cut short (a compiled setting timing what it compiled)
            result['skipped' if not rows else 'notes'].append(dict(setting=str(setting), note=note))
            print(f'{str(setting):<44} {note}', flush=True)
        if setting.compiled:
            torch.compiler.reset()  # a fresh cache per setting: no recompilation limit is reached
        release(args.device)
        save_results(result, args.json)


if __name__ == '__main__':
    sys.exit(1 if main()['failed'] else 0)
