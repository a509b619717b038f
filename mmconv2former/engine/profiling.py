"""Speed and memory measured one way in every tool (``tools/analysis/benchmark.py``,
``tools/analysis/gpu_benchmark.py``): the training and inference steps that
are timed, paired interleaved timing, peak memory of one step, the machine's
description, and the models compared: Conv2Former, its memory policies and
``switch_to_deploy()`` form, and the ConvNeXt peer (which needs mmpretrain or
timm).

How the timing works: every case runs in the same process and each repeat
times every case once, in an order rotated from repeat to repeat, so that a
noisy neighbour, a clock change or thermal drift hits all cases alike. Speed
ratios are the median of the per-repeat ratios (paired), in which such drift
cancels; a table of medians taken separately would keep it.
"""
import contextlib
import gc
import json
import os
import os.path as osp
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..models import Conv2Former

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}

#: Conv2Former arch -> the ConvNeXt of matching size and cost (N, 15M
#: parameters and 2.2 GMACs, pairs with ConvNeXt-nano's 15.6M and 2.45G).
CONVNEXT_SIZES = {'n': 'nano', 't': 'tiny', 's': 'small', 'b': 'base', 'b_22k': 'base', 'l': 'large'}


# ----------------------------------------------------------------------------- machine
def machine() -> Dict[str, Any]:
    """The processor, thread count, GPU and software versions, for result tables."""
    info: Dict[str, Any] = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                                threads=torch.get_num_threads(), python=platform.python_version(),
                                torch=torch.__version__)
    try:
        with open('/proc/cpuinfo') as f:
            info['cpu'] = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    if hasattr(os, 'getloadavg'):
        info['load_avg_1m'] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f'{props.major}.{props.minor}', cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def describe(info: Dict[str, Any]) -> str:
    """One line naming the machine of :func:`machine`."""
    gpu = (f'{info["gpu"]} ({info["gpu_memory_gib"]} GiB, sm {info["compute_capability"]}, '
           f'CUDA {info["cuda"]}, cuDNN {info["cudnn"]})' if 'gpu' in info else 'no GPU')
    load = f', load {info["load_avg_1m"]:.2f}' if 'load_avg_1m' in info else ''
    return (f'{info["cpu"]} ({info["cores"]} cores, torch uses {info["threads"]} threads{load}); '
            f'{gpu}; torch {info["torch"]}, Python {info["python"]}')


def synchronize(device: Union[str, torch.device]) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- failures
# A first run on a new GPU may meet what no CPU run shows (a kernel that does
# not compile, a compiled graph that fails, memory running out); the GPU tools
# report such a part and go on, unless the GPU itself stopped answering.
class DeviceLost(BaseException):
    """The GPU no longer answers: a kernel faulted, and CUDA errors are
    sticky, so every later part would fail the same way. A BaseException so
    that the handlers which keep a run going past one failing part let it
    through to the tool's top level, which saves what it has and stops."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {message[0][:300] if message else ""}'


def save_results(result: Dict[str, Any], path: Optional[str]) -> None:
    """Write a tool's results so far to ``path`` (if given), whole or not at
    all (through a temporary file): the GPU tools save after every part, so
    a run stopped from outside still leaves what it measured."""
    if path:
        with open(path + '.tmp', 'w') as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(path + '.tmp', path)


def release(device: Union[str, torch.device]) -> None:
    """After a part failed: free what it left behind (its tensors and, on a
    GPU, the allocator's cached blocks), and raise :class:`DeviceLost` if the
    GPU no longer answers."""
    gc.collect()
    if torch.device(device).type == 'cuda':
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as exc:
            raise DeviceLost(one_line(exc)) from exc


# ----------------------------------------------------------------------------- models
class FeatureMaps(nn.Module):
    """``forward(x) -> tuple`` of feature maps over any backbone (timm's
    ``features_only`` models return lists)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model(x))


def _convnext_plan(arch: Union[str, dict], library: str) -> Tuple[Optional[str], str, str]:
    """The ConvNeXt size (None for a dict ``arch``), the label and the library
    (``'auto'`` resolved) of :func:`build_convnext`; raises as it does."""
    if library not in ('auto', 'mmpretrain', 'timm'):
        raise ValueError(f"library must be 'auto', 'mmpretrain' or 'timm', got {library!r}")
    if isinstance(arch, str):
        if arch not in CONVNEXT_SIZES:
            raise ValueError(f'no ConvNeXt of matching size for arch {arch!r}; '
                             f'choose one of {sorted(CONVNEXT_SIZES)}')
        size, name = CONVNEXT_SIZES[arch], f'ConvNeXt-{arch.split("_")[0].upper()}'
    else:
        size, name = None, 'ConvNeXt-custom'
    if library in ('auto', 'mmpretrain'):
        try:
            from mmpretrain.models.backbones import ConvNeXt  # noqa: F401
        except ImportError:
            if library == 'mmpretrain':
                raise
        else:
            return size, f'{name} (mmpretrain)', 'mmpretrain'
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        raise ImportError('the ConvNeXt peer needs mmpretrain or timm: pip install timm') from exc
    return size, f'{name} (timm)', 'timm'


def convnext_label(arch: Union[str, dict], library: str = 'auto') -> str:
    """The label that :func:`build_convnext` gives its model, without building
    it (raising as it would where no library has a ConvNeXt)."""
    return _convnext_plan(arch, library)[1]


def build_convnext(arch: Union[str, dict], library: str = 'auto') -> Tuple[nn.Module, str]:
    """The ConvNeXt peer of a Conv2Former ``arch``, and a label naming it.

    Args:
        arch: a Conv2Former arch name (the ConvNeXt of matching size,
            :data:`CONVNEXT_SIZES`) or a dict with ``channels`` and ``depths``
            (a ConvNeXt of those widths, e.g. a tiny one for tests).
        library: ``'mmpretrain'``, ``'timm'``, or ``'auto'``: mmpretrain's
            where it imports, else timm's. Defaults to ``'auto'``.

    Returns:
        The model, returning the four stages' feature maps as a tuple (no
        pooling, no classifier), and e.g. ``'ConvNeXt-T (timm)'``.
    """
    size, label, library = _convnext_plan(arch, library)
    if library == 'mmpretrain':
        from mmpretrain.models.backbones import ConvNeXt
        spec = size or dict(channels=list(arch['channels']), depths=list(arch['depths']))
        return FeatureMaps(ConvNeXt(spec, out_indices=(0, 1, 2, 3), gap_before_final_norm=False)), label
    import timm
    extra = {} if size else dict(depths=tuple(arch['depths']), dims=tuple(arch['channels']))
    model = timm.create_model(f'convnext_{size or "tiny"}', pretrained=False, features_only=True, **extra)
    return FeatureMaps(model), label


#: Conv2Former with another training-memory policy than its default
#: (``recompute=True``), as constructor arguments: they differ in training only.
MEMORY_PEERS = {'recompute-off': dict(recompute=False), 'recompute-modulation': dict(recompute='modulation'),
                'with-cp': dict(with_cp=True)}

#: Conv2Former with another implementation of an operator, as constructor
#: arguments: the Triton depthwise convolution (mmconv2former/ops).
KERNEL_PEERS = {'triton-depthwise': dict(depthwise_impl='triton')}

#: The keys of :func:`build_models`.
VARIANTS = ('conv2former', *MEMORY_PEERS, *KERNEL_PEERS, 'deploy', 'convnext')


def conv2former_name(arch: Union[str, dict]) -> str:
    """``'Conv2Former-T'`` for arch ``'t'``, ``'Conv2Former-custom'`` for a dict."""
    return f'Conv2Former-{arch.upper()}' if isinstance(arch, str) else 'Conv2Former-custom'


def build_conv2former(arch: Union[str, dict], **kwargs) -> nn.Module:
    """``Conv2Former(arch, **kwargs)`` with the release's initialisation
    (``init_weights()``), from seed 0: every call gives the same weights."""
    torch.manual_seed(0)
    model = Conv2Former(arch, **kwargs)
    model.init_weights()
    return model


def build_models(keys: Sequence[str], arch: Union[str, dict], convnext_arch: Union[str, dict, None] = None,
                 convnext: str = 'auto') -> List[Tuple[str, str, nn.Module]]:
    """``(key, label, model)`` for each of ``keys`` (:data:`VARIANTS`), in
    the order given.

    Args:
        keys: ``'conv2former'`` (Conv2Former-``arch``, labelled by
            :func:`conv2former_name`), a key of :data:`MEMORY_PEERS` or
            :data:`KERNEL_PEERS` (it with those arguments, ``'<name> <key>'``), ``'deploy'`` (its
            ``switch_to_deploy()`` form, in eval mode) or ``'convnext'``
            (:func:`build_convnext`).
        arch: the Conv2Former arch.
        convnext_arch: the ConvNeXt's ``arch`` argument. Defaults to ``arch``.
        convnext: whose ConvNeXt (``library`` of :func:`build_convnext`).
            Defaults to ``'auto'``.

    Every Conv2Former comes from :func:`build_conv2former`, so all hold the
    same weights; the ConvNeXt is built from seed 0 with its own init.
    """
    unknown = sorted(set(keys) - set(VARIANTS))
    if unknown:
        raise ValueError(f'unknown models {unknown}; choose from {", ".join(VARIANTS)}')
    name, models = conv2former_name(arch), []
    for key in keys:
        if key == 'convnext':
            torch.manual_seed(0)
            model, label = build_convnext(arch if convnext_arch is None else convnext_arch, library=convnext)
        elif key == 'deploy':
            model, label = build_conv2former(arch).eval().switch_to_deploy(), f'{name} switch_to_deploy()'
        elif key in MEMORY_PEERS or key in KERNEL_PEERS:
            kwargs = MEMORY_PEERS[key] if key in MEMORY_PEERS else KERNEL_PEERS[key]
            model, label = build_conv2former(arch, **kwargs), f'{name} {key}'
        else:
            model, label = build_conv2former(arch), name
        models.append((key, label, model))
    return models


# ----------------------------------------------------------------------------- steps
def autocast(device: Union[str, torch.device], dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` (``'bf16'``, ``'fp16'``), or off for ``'fp32'``."""
    device = torch.device(device).type
    if dtype == 'fp32':
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=DTYPES[dtype])


def mean_of_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A backbone's stand-in loss: the sum of its feature maps' means, in fp32."""
    return sum(o.float().mean() for o in outputs)


def mean_square_of_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A stand-in loss for comparing gradients: the sum of the feature maps'
    mean squares. (The mean of a LayerNorm-ed map hardly depends on its input
    while the norm's weight is uniform, as at initialisation, so
    :func:`mean_of_outputs` gives gradients of rounding-noise size, which
    two implementations of one operator do not round alike.)"""
    return sum(o.float().square().mean() for o in outputs)


class TrainStep:
    """One training step of ``model(inputs, **call_kwargs)``: forward under
    autocast to ``dtype``, ``loss_fn`` of the outputs, backward, an AdamW
    update, and the gradients set to None (here rather than at the next
    step's start, so that a step allocates and frees its own gradients, see
    :func:`peak_memory`). Under fp16 the loss goes through a ``GradScaler``,
    as mmengine's ``AmpOptimWrapper`` does, which skips updates whose
    gradients overflowed. ``model`` may be a ``torch.compile``-d module.
    Calling it returns the detached loss.
    """

    def __init__(self, model: nn.Module, inputs: Any, dtype: str = 'fp32',
                 loss_fn: Callable[[Any], torch.Tensor] = mean_of_outputs, lr: float = 1e-4,
                 **call_kwargs) -> None:
        self.model, self.inputs, self.dtype, self.loss_fn = model, inputs, dtype, loss_fn
        self.call_kwargs = call_kwargs
        params = [p for p in model.parameters() if p.requires_grad]
        self.device = params[0].device
        try:
            # Fused: the update allocates no parameter-sized temporaries, so
            # that a step's peak memory is its activations and gradients.
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, fused=True)
        except RuntimeError:  # torch < 2.4 on CPU
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype == 'fp16' else None
        model.train()

    def __call__(self) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            loss = self.loss_fn(self.model(self.inputs, **self.call_kwargs))
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def make_step(model: nn.Module, inputs: Any, training: bool, dtype: str = 'fp32',
              loss_fn: Callable[[Any], torch.Tensor] = mean_of_outputs,
              **call_kwargs) -> Callable[[], Any]:
    """A :class:`TrainStep`, or one inference step: the forward pass of
    ``model(inputs, **call_kwargs)`` in eval mode under
    ``torch.inference_mode`` and autocast to ``dtype``."""
    if training:
        return TrainStep(model, inputs, dtype, loss_fn, **call_kwargs)
    model.eval()
    device = next(model.parameters()).device

    def infer() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(inputs, **call_kwargs)
    return infer


def gradients(model: nn.Module, x: torch.Tensor, dtype: str,
              call: Optional[Callable[[torch.Tensor], Any]] = None,
              loss_fn: Callable[[Any], torch.Tensor] = mean_of_outputs) -> Dict[str, torch.Tensor]:
    """fp32 copies of the gradients of ``model``'s parameters (those that get
    one) from ``loss_fn`` of ``call(x)`` (default ``model``; e.g. its
    ``torch.compile``-d wrapper) in training mode under autocast to
    ``dtype``."""
    model.train().zero_grad(set_to_none=True)
    with autocast(x.device, dtype):
        loss = loss_fn((model if call is None else call)(x))
    # Scaled as a GradScaler would, so that fp16 gradients stay normal numbers.
    (loss * 1024).backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- memory
def peak_memory(step: Callable[[], Any], device: Union[str, torch.device]) -> float:
    """Peak bytes of tensor memory allocated during ``step()`` above what was
    live before it (weights, optimiser state, inputs: run one step first so
    that the optimiser state exists).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of every
    allocation and free that ``torch.profiler`` records with
    ``profile_memory=True``: exact bytes, independent of the C allocator's
    caching; it excludes memory that libraries allocate behind PyTorch's back,
    which oneDNN does not do for these models.
    """
    if torch.device(device).type == 'cuda':
        # The device given, not the current one: ``cuda:1`` would otherwise
        # time kernel launches and read another GPU's counters.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)['traceEvents']
                      if e.get('name') == '[memory]' and e.get('args', {}).get('Device Type', 0) == 0]
    live = peak = 0
    for event in sorted(events, key=lambda e: e['ts']):
        live += event['args']['Bytes']
        peak = max(peak, live)
    return float(peak)


# ----------------------------------------------------------------------------- timing
@dataclass
class Case:
    """One thing to time: ``step()`` processes ``images`` images."""
    name: str
    step: Callable[[], Any]
    images: int
    key: str = ''
    samples: List[Dict[str, float]] = field(default_factory=list)


def time_interleaved(cases: Sequence[Case], repeats: int, warmup: int = 2, iters: int = 1,
                     device: Union[str, torch.device] = 'cpu', clock: str = 'wall') -> None:
    """Time every case ``repeats`` times, rotating the order each repeat.

    Each case first runs ``warmup`` untimed steps (compilation, cuDNN's
    algorithm search and the optimiser state happen there). A sample is
    ``iters`` steps followed by a device synchronisation; it keeps wall and
    process CPU seconds per step, and ``seconds`` is the one ``clock`` names
    (CPU time only means something on CPU, best with one thread, where time
    spent descheduled by a busy host does not count).
    """
    if clock not in ('wall', 'cpu'):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    for case in cases:
        for _ in range(warmup):
            case.step()
    synchronize(device)
    for r in range(repeats):
        shift = r % len(cases)
        for case in list(cases[shift:]) + list(cases[:shift]):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(iters):
                case.step()
            synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            sample = dict(wall=wall / iters, cpu=cpu / iters, cpu_per_wall=cpu / wall)
            sample['seconds'] = sample[clock]
            case.samples.append(sample)


def summarise(case: Case) -> Dict[str, Any]:
    """Images per second of ``case``: median, min and max over its samples."""
    rates = sorted(case.images / s['seconds'] for s in case.samples)
    return dict(name=case.name, key=case.key, img_per_s=statistics.median(rates), min=rates[0],
                max=rates[-1], ms_per_step=1e3 * statistics.median(s['seconds'] for s in case.samples),
                cpu_per_wall=statistics.median(s['cpu_per_wall'] for s in case.samples),
                repeats=len(rates))


def paired_ratio(case: Case, base: Case) -> Dict[str, float]:
    """How many times ``case`` is faster than ``base`` per image: the median
    (min, max) of the ratios of samples taken in the same repeat."""
    ratios = sorted((b['seconds'] / base.images) / (a['seconds'] / case.images)
                    for a, b in zip(case.samples, base.samples))
    return dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1])
