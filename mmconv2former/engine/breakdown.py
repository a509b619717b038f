"""Where one step's time goes: ``torch.profiler`` over one training or
inference step, its time split by operator kind (depthwise convolution by
kernel size, dense convolution, matrix products, norms, GELU, casts, the
optimiser, the rest) and by pass (forward, backward, recomputed), and the
kernels that took longest.

Each operator is counted once, at the outermost profiled call that names a
kind (``aten::convolution`` holds the cuDNN call beneath it), with the device
time of every kernel launched under it (on a CPU: its CPU time). Work inside
an autograd ``evaluate_function`` is the backward pass; a forward operator
found there (a convolution, a matrix product, a norm, a GELU) ran again for
selective activation checkpointing and counts as ``recomputed``; the
operators whose outputs the policy stored are called there too, but return
the stored tensor: no kernel, so no device time (on a CPU, a little Python
time).
"""
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: Operator names -> kind. Convolutions are told apart by their weight's shape.
KINDS = {
    'matrix products': ('aten::linear', 'aten::addmm', 'aten::mm', 'aten::bmm', 'aten::matmul'),
    'layer norm': ('aten::layer_norm', 'aten::native_layer_norm', 'aten::native_layer_norm_backward'),
    'batch norm': ('aten::batch_norm', 'aten::native_batch_norm', 'aten::cudnn_batch_norm',
                   'aten::_batch_norm_impl_index', 'aten::native_batch_norm_backward',
                   'aten::cudnn_batch_norm_backward'),
    'GELU': ('aten::gelu', 'aten::gelu_backward'),
    'casts and copies': ('aten::to', 'aten::_to_copy', 'aten::copy_', 'aten::clone', 'aten::contiguous'),
}
_KIND_OF = {name: kind for kind, names in KINDS.items() for name in names}
#: Operators that only a forward pass calls: met inside the backward pass,
#: they were recomputed (a linear layer's backward pass calls ``aten::mm``).
FORWARD_ONLY = ('aten::convolution', 'aten::linear', 'aten::addmm', 'aten::matmul', 'aten::layer_norm',
                'aten::native_layer_norm', 'aten::batch_norm', 'aten::native_batch_norm',
                'aten::cudnn_batch_norm', 'aten::_batch_norm_impl_index', 'aten::gelu',
                'mmconv2former::depthwise_conv_nhwc')
OTHER = 'other (elementwise, reductions, ...)'
OPTIMISER = 'optimiser and grad scaler'


def operator_kind(name: str, input_shapes: Sequence[Any]) -> Optional[str]:
    """The kind of a profiled operator, or None for one that is not named
    (its own time then counts as :data:`OTHER` and its children are looked at)."""
    if name.startswith(('Optimizer.step', 'Optimizer.zero_grad')) or name.startswith(
            ('aten::_fused_adam', 'aten::_foreach_', 'aten::_amp_')):
        return OPTIMISER
    if name.startswith('mmconv2former::depthwise_conv_nhwc'):  # the Triton operators (mmconv2former/ops)
        index = 2 if name.endswith('weight_grad') else 1
        weight = input_shapes[index] if len(input_shapes) > index else []
        return f'depthwise conv {weight[-1]}x{weight[-2]} (Triton)' if len(weight) == 4 else 'depthwise conv (Triton)'
    if name in ('aten::convolution', 'aten::convolution_backward'):
        weight = input_shapes[1 if name == 'aten::convolution' else 2] if len(input_shapes) > 2 else []
        if len(weight) == 4 and weight[1] == 1 and weight[2] * weight[3] > 1:
            return f'depthwise conv {weight[2]}x{weight[3]}'
        return 'dense conv'
    return _KIND_OF.get(name)


def _phase(name: str, in_backward: bool) -> str:
    if not in_backward:
        return 'forward'
    return 'recomputed' if name in FORWARD_ONLY else 'backward'


def step_breakdown(step: Callable[[], Any], device: str, top: int = 25) -> Dict[str, Any]:
    """Profile one call of ``step`` (warm it up first) and split its time.

    Returns a dict with ``device_time`` (True: kernel time on the GPU;
    False: CPU time of the operators), ``total_ms`` (all kernels; on a CPU
    the top-level operators), ``kinds`` (``'<kind>, <pass>'`` -> ms, largest
    first) and ``kernels`` (the ``top`` longest kernels, on a CPU the longest
    operators by own time: name, kind, calls, ms).
    """
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]

    kinds: Dict[str, float] = defaultdict(float)
    kernels: Dict[Tuple[str, str], List] = {}  # (kernel, kind) -> [calls, microseconds]

    def own(event) -> float:
        return sum(k.duration for k in event.kernels) if cuda else event.self_cpu_time_total

    def note_kernels(event, label: str) -> None:
        # The kernels an event launched itself; on a CPU the event stands for its kernels.
        if cuda:
            items = [(k.name, k.duration) for k in event.kernels]
        else:
            items = [(event.name, event.self_cpu_time_total)] if event.self_cpu_time_total > 0 else []
        for name, duration in items:
            entry = kernels.setdefault((name, label), [0, 0.0])
            entry[0] += 1
            entry[1] += duration

    def visit(event, in_backward: bool, label: Optional[str]) -> None:
        in_backward = in_backward or event.name.startswith('autograd::engine::evaluate_function')
        if label is None:
            kind = operator_kind(event.name, event.input_shapes or [])
            if kind is not None:
                label = kind if kind == OPTIMISER else f'{kind}, {_phase(event.name, in_backward)}'
                kinds[label] += event.device_time_total if cuda else event.cpu_time_total
        if label is None:
            kinds[OTHER] += own(event)
        note_kernels(event, label or OTHER)
        for child in event.cpu_children:
            visit(child, in_backward, label)

    roots = [e for e in events if e.cpu_parent is None]
    for root in roots:
        visit(root, False, None)
    total = sum(kinds.values())
    ordered = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
    return dict(
        device_time=cuda,
        total_ms=total / 1e3,
        kinds={k: v / 1e3 for k, v in sorted(kinds.items(), key=lambda item: -item[1]) if v > 0},
        kernels=[dict(name=name, kind=kind, calls=calls, ms=us / 1e3) for (name, kind), (calls, us) in ordered])


__all__ = ['KINDS', 'operator_kind', 'step_breakdown']
