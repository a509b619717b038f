"""Throughput and peak memory of Conv2Former, next to its peers, in one process.

    # backbone, inference: Conv2Former-T (plain and switch_to_deploy()) vs
    # mmpretrain ConvNeXt-T, with the matmul FLOP rate of this machine
    python tools/analysis/benchmark.py --arch t --batch 8 --input-size 224 --peers deploy,convnext
    # backbone, training step: time and peak activation memory, with the
    # store-everything form (recompute=False) beside the default
    python tools/analysis/benchmark.py --arch t --batch 8 --mode train --memory --peers store-all,convnext
    # cost per pixel from 224 to 1024 (table, PNG plot)
    python tools/analysis/benchmark.py --arch t --batch 1 --sweep 224 320 448 640 800 1024 --plot sweep.png
    # training-step peak memory with and without activation checkpointing
    python tools/analysis/benchmark.py --arch t --batch 1 --input-size 1024 --cp-memory
    # a whole model from a config (mmdet, mmseg or mmpretrain), training step,
    # against mmdet's own ConvNeXt-T Mask R-CNN config
    python tools/analysis/benchmark.py configs/mask_rcnn/mask-rcnn_conv2former-t_fpn_1x_coco.py \\
        --mode train --batch 2 --input-size 512 --memory \\
        --peer-config mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py

How it measures
  * Every model (and a large fp32 matrix product, the machine's practical
    FLOP ceiling) runs in the same process, interleaved: each repeat times
    every case once, in an order rotated from repeat to repeat, so that a
    noisy neighbour or a clock change hits all cases alike. Ratios are the
    median of the per-repeat ratios (paired), so drift cancels.
  * Throughput is images per second of wall time after ``--warmup`` steps;
    the table gives the median, the min-max range over ``--repeats`` and the
    interquartile spread. ``cpu/wall`` (CPU seconds per wall second) and the
    page faults per step tell how contended the machine was and how much
    time went to the kernel mapping fresh memory. On a shared machine,
    ``--threads 1 --clock cpu`` counts images per CPU-second instead, which
    time spent descheduled does not inflate (cache and memory-bandwidth
    contention still do).
  * FLOPs are multiply-adds (as in get_flops.py) counted by
    ``torch.utils.flop_counter`` on convolutions and matrix products; the
    "of matmul" column is ``2 * MACs * img/s`` divided by the measured rate
    of the matrix product.
  * Peak memory is the peak of tensor memory allocated during one step above
    what was live before it (weights, inputs). On GPU:
    ``torch.cuda.max_memory_allocated``. On CPU: the running sum of every
    allocation and free that ``torch.profiler`` records with
    ``profile_memory=True`` (exact bytes, independent of the C allocator's
    caching; it excludes memory that libraries allocate behind PyTorch's
    back, which oneDNN does not do for these models).
"""
import argparse
import contextlib
import functools
import json
import os
import os.path as osp
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # run from a checkout

from mmconv2former.models import Conv2Former  # noqa: E402
from mmconv2former.models.reference import ReferenceConv2Former  # noqa: E402
from mmconv2former.models.layers import ConvNHWC  # noqa: E402

# Conv2Former variant -> mmpretrain ConvNeXt of matching size and cost
# (N, 15M parameters, ~2.2 GMACs, pairs with ConvNeXt-nano, 15.6M / 2.45G).
CONVNEXT_PEER = {'n': 'nano', 't': 'tiny', 's': 'small', 'b': 'base', 'b_22k': 'base', 'l': 'large'}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# Targets checked when a run matches their setting (Conv2Former-T, fp32,
# batch 8, 224x224; Mask R-CNN training at 2 x 512x512): speed and peak
# activation memory of a training step relative to ConvNeXt-T (issue 13),
# inference speed of the deploy form relative to ConvNeXt-T (issue 13), and
# the cost per pixel from 224 to 1024 (issue 6).
TARGETS = dict(train_speed=1.0, train_memory=1.0, deploy_speed=0.88, per_pixel_1024_vs_224=1.15)
LABELS = {'conv2former': 'Conv2Former-{arch}', 'deploy': 'Conv2Former-{arch} deploy',
          'store-all': 'Conv2Former-{arch} store-all', 'selective': 'Conv2Former-{arch} selective',
          'native-off': 'Conv2Former-{arch} native-off', 'reference': 'release-style reference',
          'convnext': 'ConvNeXt-{peer} (mmpretrain)'}


# ---------------------------------------------------------------------------- cases
class Case:
    """One thing to time: ``step()`` runs one inference or training step."""

    def __init__(self, name: str, step: Callable[[], None], images: int, pixels: int,
                 macs_per_image: Optional[float] = None, key: str = '') -> None:
        self.name, self.step, self.images, self.pixels = name, step, images, pixels
        self.key = key or name  # 'conv2former', 'convnext', 'reference', 'matmul'
        self.macs_per_image = macs_per_image
        self.samples: List[dict] = []


class _Stages(nn.Module):
    """Uniform ``forward(x) -> tuple of feature maps`` over the backbones."""

    def __init__(self, model: nn.Module, method: str = 'forward') -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor):
        return tuple(getattr(self.model, self.method)(x))


def apply_variant(model: nn.Module, name: str) -> nn.Module:
    """Every Conv2Former in ``model`` as the ``deploy``, ``store-all``
    (``recompute=False``), ``selective`` (``recompute='selective'``) or
    ``native-off`` (PyTorch's kernels instead of the native ones) variant; other names
    leave it as built."""
    for module in model.modules():
        if isinstance(module, Conv2Former):
            module.recompute = {'store-all': False, 'selective': 'selective'}.get(name, True)
            if name == 'deploy':
                module.switch_to_deploy()
        if isinstance(module, ConvNHWC) and name == 'native-off':
            module.native_weight_grad = False
    return model


def build_backbone(name: str, arch: str, with_cp: bool = False) -> nn.Module:
    """``conv2former``, ``deploy``, ``store-all``, ``selective``, ``native-off``, ``convnext`` (mmpretrain,
    matching size) or ``reference``."""
    settings = Conv2Former.parse_arch(arch)
    if name in ('conv2former', 'deploy', 'store-all', 'selective', 'native-off'):
        return _Stages(apply_variant(Conv2Former(arch, out_indices=(0, 1, 2, 3), with_cp=with_cp), name))
    if name == 'reference':
        return _Stages(ReferenceConv2Former(settings['channels'], settings['depths'],
                                            settings['kernel_size'], settings['mlp_ratio']),
                       'forward_stages')
    if name == 'convnext':
        from mmpretrain.models.backbones import ConvNeXt
        size = CONVNEXT_PEER.get(arch) if isinstance(arch, str) else None
        if size is None:
            raise ValueError(f'no ConvNeXt peer for arch {arch!r}; use --peers reference or none')
        return _Stages(ConvNeXt(size, out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                                with_cp=with_cp))
    raise ValueError(f'unknown model {name!r}')


def count_macs(forward: Callable[[], object]) -> float:
    """Multiply-adds of convolutions and matrix products in one call."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    return counter.get_total_flops() / 2


def autocast(device: str, dtype: str):
    if dtype == 'fp32':
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=DTYPES[dtype])


def make_step(model: nn.Module, inputs: torch.Tensor, args, loss_fn=None) -> Callable[[], None]:
    """One inference step (no grad) or training step (forward, backward, SGD)."""
    device = inputs.device.type
    if args.mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast(device, args.dtype):
                model(inputs)
        return step
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    loss_fn = loss_fn or (lambda outs: sum(o.float().mean() for o in outs))

    def step():
        with autocast(device, args.dtype):
            loss = loss_fn(model(inputs))
        loss.backward()
        optimizer.step()
        # Freed here rather than at the next step's start, so that a step
        # allocates and frees its own gradients (see `peak_memory`).
        optimizer.zero_grad(set_to_none=True)
    return step


def prepare(model: nn.Module, args) -> nn.Module:
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def backbone_cases(args, size, batch: int) -> List[Case]:
    h, w = size
    x = torch.randn(batch, 3, h, w, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cases = []
    for name in ['conv2former'] + args.peers:
        torch.manual_seed(0)
        model = prepare(build_backbone(name, args.arch), args)
        macs = count_macs(lambda: model.eval()(x[:1]))
        if args.compile:
            model = torch.compile(model)
        label = LABELS[name].format(arch=args.arch, peer=CONVNEXT_PEER.get(args.arch, '?'))
        cases.append(Case(label, make_step(model, x, args), batch, batch * h * w, macs, name))
    return cases


# ---------------------------------------------------------------------------- config models
def convnext_backbone_cfg(cfg) -> dict:
    """The config's model with the backbone swapped for mmpretrain's ConvNeXt."""
    import copy
    model = copy.deepcopy(cfg.model)
    arch = model.backbone.get('arch', 't')
    size = CONVNEXT_PEER[arch]
    from mmpretrain.models.backbones import ConvNeXt
    channels = ConvNeXt.arch_settings[size]['channels']
    model.backbone = dict(type='mmpretrain.ConvNeXt', arch=size, out_indices=(0, 1, 2, 3),
                          drop_path_rate=model.backbone.get('drop_path_rate', 0.0),
                          gap_before_final_norm=False)
    if 'neck' in model and 'in_channels' in model.neck:            # mmdet FPN
        model.neck.in_channels = channels
    if 'decode_head' in model:                                      # mmseg UPerNet
        model.decode_head.in_channels = channels
        if model.get('auxiliary_head'):
            model.auxiliary_head.in_channels = channels[2]
    return model


def config_cases(args, size, batch: int) -> List[Case]:
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    from mmconv2former.engine.runtime import detect_library, library_models

    cfg = Config.fromfile(args.config)
    library = detect_library(cfg)
    if 'convnext' in args.peers:
        import mmpretrain.models  # noqa: F401  (ConvNeXt for the peer)
    registry = library_models(library)
    h, w = size
    cases = []
    variants = [('conv2former', osp.basename(args.config), cfg.model)]
    for peer in ('deploy', 'store-all', 'selective', 'native-off'):
        if peer in args.peers:
            variants.append((peer, f'{osp.basename(args.config)} {peer}', cfg.model))
    if args.peer_config:
        from mmconv2former.swap import resolve_config  # also takes mmdet::... paths
        peer_cfg = Config.fromfile(resolve_config(args.peer_config))
        if detect_library(peer_cfg) != library:
            raise ValueError(f'--peer-config is a {detect_library(peer_cfg)} config, '
                             f'{args.config} a {library} one')
        variants.append(('convnext', osp.basename(args.peer_config), peer_cfg.model))
    elif 'convnext' in args.peers:
        if library == 'mmpretrain':
            raise ValueError('--peers convnext with a config: only mmdet and mmseg models')
        variants.append(('convnext', 'same model, ConvNeXt backbone', convnext_backbone_cfg(cfg)))
    for key, label, model_cfg in variants:
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope(library):
            # Built but not initialised: no checkpoint is read; speed does not depend on values.
            model = prepare(apply_variant(revert_sync_batchnorm(registry.build(model_cfg)), key), args)
            data = demo_batch(library, model, batch, h, w, args.mode == 'train')
        inputs, samples = data['inputs'].to(args.device), data['data_samples']
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        tensor_samples = None if library == 'mmpretrain' else samples
        macs = count_macs(lambda: model.eval()(inputs[:1], tensor_samples and tensor_samples[:1],
                                                mode='tensor'))
        net = torch.compile(model) if args.compile else model
        if args.mode == 'infer':
            step = make_step(_Call(net, tensor_samples, 'tensor'), inputs, args)
        else:
            step = make_step(_Call(net, samples, 'loss'), inputs, args,
                             loss_fn=lambda losses: model.parse_losses(losses)[0])
        cases.append(Case(label, step, batch, batch * inputs.shape[-2] * inputs.shape[-1], macs, key))
    return cases


class _Call(nn.Module):
    """``model(inputs, data_samples, mode=...)`` as a one-argument module."""

    def __init__(self, model: nn.Module, samples, mode: str) -> None:
        super().__init__()
        self.model, self.samples, self.mode = model, samples, mode

    def forward(self, inputs):
        return self.model(inputs, self.samples, mode=self.mode)


def demo_batch(library: str, model: nn.Module, batch: int, h: int, w: int, train: bool) -> dict:
    """Random images (and, for training, random targets) through the data preprocessor."""
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(batch)]
    meta = dict(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0))
    if library == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        data = demo_mm_inputs(batch_size=batch, image_shapes=[(3, h, w)] * batch,
                              num_items=[5] * batch, with_mask=True)
        data['inputs'] = images
    elif library == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        samples = []
        for _ in range(batch):
            sample = SegDataSample(metainfo=meta)
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, h, w)))
            samples.append(sample)
        data = dict(inputs=images, data_samples=samples)
    else:
        from mmpretrain.structures import DataSample
        data = dict(inputs=images, data_samples=[DataSample().set_gt_label(0) for _ in range(batch)])
    return model.data_preprocessor(data, training=train)


# ---------------------------------------------------------------------------- timing
def matmul_case(device: str, n: int = 2048) -> Case:
    """An fp32 ``n x n`` matrix product: the practical FLOP ceiling of the machine."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    # One "image" is one product of n^3 multiply-adds, so gflop_per_s comes out as for a model.
    return Case(f'matmul {n}x{n} fp32', lambda: torch.mm(a, b, out=out), 1, 0, float(n) ** 3, 'matmul')


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def run_interleaved(cases: List[Case], repeats: int, warmup: int, iters: int, device: str,
                    clock: str = 'wall') -> None:
    """Time each case ``repeats`` times, rotating the order every repeat.

    Each sample keeps wall and process CPU seconds; ``seconds`` is the one
    ``clock`` names (CPU time only makes sense on CPU, best with one thread).
    """
    for case in cases:
        for _ in range(warmup):
            case.step()
    _sync(device)
    for r in range(repeats):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(iters):
                case.step()
            _sync(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            case.samples.append(dict(
                wall=wall / iters, cpu=cpu / iters, cpu_per_wall=cpu / wall,
                faults=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / iters))
            case.samples[-1]['seconds'] = case.samples[-1][clock]


def summarise(case: Case) -> dict:
    rates = sorted(case.images / s['seconds'] for s in case.samples)
    q = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
    med = statistics.median(rates)
    out = dict(name=case.name, key=case.key, img_per_s=med, min=rates[0], max=rates[-1],
               iqr_pct=100 * (q[2] - q[0]) / med, cpu_per_wall=statistics.median(s['cpu_per_wall'] for s in case.samples),
               faults_per_step=statistics.median(s['faults'] for s in case.samples),
               seconds=[s['seconds'] for s in case.samples])
    if case.macs_per_image:
        out['gmacs_per_image'] = case.macs_per_image / 1e9
        out['gflop_per_s'] = 2 * case.macs_per_image * med / 1e9
    if case.pixels:
        out['ns_per_pixel'] = 1e9 * statistics.median(s['seconds'] for s in case.samples) / case.pixels
    return out


def paired_ratio(a: Case, b: Case) -> dict:
    """How many times faster ``a`` is than ``b``, per repeat (a and b timed back to back)."""
    ratios = sorted(sb['seconds'] / b.images / (sa['seconds'] / a.images)
                    for sa, sb in zip(a.samples, b.samples))
    return dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1])


# ---------------------------------------------------------------------------- memory
def peak_memory(step: Callable[[], None], device: str) -> float:
    """Peak bytes allocated during ``step()`` above what was live before it."""
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
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


def cp_memory(args, size) -> dict:
    """Training-step peak memory of Conv2Former storing everything
    (``recompute=False``), with selective recomputation (the default) and
    with full checkpointing (``with_cp=True``)."""
    h, w = size
    x = torch.randn(args.batch, 3, h, w, device=args.device)
    result = {}
    for name in ('store-all', 'conv2former', 'with_cp'):
        torch.manual_seed(0)
        model = prepare(build_backbone('store-all' if name == 'store-all' else 'conv2former', args.arch,
                                       with_cp=name == 'with_cp'), args)
        step = make_step(model, x, argparse.Namespace(**{**vars(args), 'mode': 'train'}))
        step()  # warm-up: optimizer state and oneDNN caches exist before measuring
        start = time.perf_counter()
        result[name] = dict(peak_bytes=peak_memory(step, args.device),
                            seconds=time.perf_counter() - start)
        del model, step
    return result


def depthwise_probe(args, size, steps_for: Callable[[int, int, tuple], Dict[str, Callable]],
                    inference: bool = False) -> List[dict]:
    """Time, interleaved, the calls that ``steps_for(k, width, nhwc_shape)``
    returns (``{label: fn}``) for both depthwise convs of every stage (the
    k x k one at C and the MLP's 3x3 at 4C); ms per call."""
    settings = Conv2Former.parse_arch(args.arch)
    h, w = size
    cases = []
    for i, c in enumerate(settings['channels']):
        side_h, side_w = h // Conv2Former.strides[i], w // Conv2Former.strides[i]
        for k, width in ((settings['kernel_size'], c), (3, c * settings['mlp_ratio'])):
            for label, fn in steps_for(k, width, (args.batch, side_h, side_w, width)).items():
                cases.append(Case(f'stage {i + 1} dw{k}x{k} C={width} {label}', fn, 1, 0))
    with torch.inference_mode() if inference else contextlib.nullcontext():
        run_interleaved(cases, args.repeats, args.warmup, max(args.iters, 5), args.device, args.clock)
    return [dict(name=case.name, ms=1e3 * statistics.median(s['seconds'] for s in case.samples))
            for case in cases]


def layout_probe(args, size) -> List[dict]:
    """Time each stage's depthwise convs channels-last vs NCHW (with and without conversions).

    The backbone keeps its data channels-last; this shows what an NCHW
    depthwise conv would cost at each stage, the two permute-copies included.
    """
    import torch.nn.functional as F

    def steps_for(k, width, shape):
        weight = torch.randn(width, 1, k, k, device=args.device)
        bias = torch.randn(width, device=args.device)
        nhwc = torch.randn(shape, device=args.device)
        nchw = nhwc.permute(0, 3, 1, 2).contiguous()

        def conv(t):
            return F.conv2d(t, weight, bias, padding=k // 2, groups=width)

        return {'channels-last': lambda: conv(nhwc.permute(0, 3, 1, 2)),
                'NCHW kernel': lambda: conv(nchw),
                'NCHW + 2 conversions': lambda: conv(
                    nhwc.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1).contiguous()}

    return depthwise_probe(args, size, steps_for, inference=True)


def wgrad_probe(args, size) -> List[dict]:
    """Time each stage's depthwise weight gradients: the native kernel
    (``mmconv2former.models.native``) vs PyTorch's (oneDNN on CPU); and, for
    the MLP, its whole backward pass between ``fc2`` and ``fc1``
    (:func:`~mmconv2former.models.recompute.mlp_middle_backward`): one native
    sweep vs PyTorch's operators."""
    from mmconv2former.models.native import native_library, native_weight_grad
    from mmconv2former.models.recompute import mlp_middle_backward
    if args.device != 'cpu' or native_library() is None:
        raise SystemExit('--wgrad-probe needs a CPU and the native kernels (a C++ compiler)')
    mlp_ratio = Conv2Former.parse_arch(args.arch)['mlp_ratio']

    def steps_for(k, width, shape):
        weight, bias = torch.randn(width, 1, k, k), torch.randn(width)
        x, grad = torch.randn(shape), torch.randn(shape)
        steps = {'native': lambda: native_weight_grad(x, grad, k),
                 'PyTorch': lambda: torch.ops.aten.convolution_backward(
                     grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [width], [1, 1],
                     [k // 2, k // 2], [1, 1], False, [0, 0], width, [False, True, True])}
        if k == 3:  # the MLP's 3x3: also its whole middle, fc2 -> fc1
            grad_out = torch.randn(*shape[:-1], width // mlp_ratio)
            fc2_w = torch.randn(width // mlp_ratio, width, 1, 1)
            for label, native in (('MLP backward native', True), ('MLP backward PyTorch', False)):
                steps[label] = functools.partial(mlp_middle_backward, grad_out, x, fc2_w, weight,
                                                 bias, native=native)
        return steps

    return depthwise_probe(args, size, steps_for)


# ---------------------------------------------------------------------------- output
def machine() -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine())
    try:
        with open('/proc/cpuinfo') as f:
            info['cpu'] = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        info['cores'] = os.cpu_count()
        info['load_avg_1m'] = os.getloadavg()[0]
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


def print_table(rows: List[dict], ratios: Dict[str, dict], matmul: Optional[dict], show_memory: bool,
                base: str) -> None:
    head = f'{"model":<40} {"img/s":>8} {"min-max":>13} {"IQR":>6} {"GMACs":>6} {"of matmul":>9} ' \
           f'{"cpu/wall":>8} {"faults":>7}'
    if show_memory:
        head += f' {"peak MB":>8} {"memory":>7}'
    head += f'  speed vs {base} (paired median, min-max)'
    print(head)
    print('-' * len(head))
    for row in rows:
        frac = f'{row["gflop_per_s"] / matmul["gflop_per_s"]:.0%}' if matmul and 'gflop_per_s' in row else ''
        line = (f'{row["name"]:<40} {row["img_per_s"]:8.2f} {row["min"]:6.2f}-{row["max"]:<6.2f} '
                f'{row["iqr_pct"]:5.1f}% {row.get("gmacs_per_image", 0):6.2f} {frac:>9} '
                f'{row["cpu_per_wall"]:8.2f} {row["faults_per_step"]:7.0f}')
        if show_memory:
            line += f' {row.get("peak_bytes", float("nan")) / 2**20:8.0f} {row.get("memory_ratio", 1):6.2f}x'
        if row['name'] in ratios:
            r = ratios[row['name']]
            line += f'  {r["median"]:.2f}x ({r["min"]:.2f}-{r["max"]:.2f})'
        print(line)
    if matmul:
        per = matmul['gflop_per_s'] / matmul['img_per_s']
        print(f'{matmul["name"]:<40} {matmul["gflop_per_s"]:8.1f} GFLOP/s (min-max '
              f'{matmul["min"] * per:.0f}-{matmul["max"] * per:.0f}, IQR {matmul["iqr_pct"]:.1f}%), '
              f'cpu/wall {matmul["cpu_per_wall"]:.2f}')


def check_targets(args, result: dict) -> List[dict]:
    """The targets in :data:`TARGETS`, where this run's setting is theirs."""
    checks = []
    rows = {r['key']: r for r in result.get('throughput', [])}
    ratios = result.get('ratios', {})
    size = tuple(result['input_size'])
    backbone_t = (not args.config and args.arch == 't' and args.batch == 8 and size == (224, 224))
    mask_rcnn_t = (args.config and 'mask-rcnn_conv2former-t' in args.config and args.batch == 2
                   and size == (512, 512) and args.peer_config)
    if args.dtype == 'fp32' and 'convnext' in rows and (backbone_t or mask_rcnn_t):
        what = 'backbone' if backbone_t else 'Mask R-CNN'
        if args.mode == 'train' and 'conv2former' in rows:
            row = rows['conv2former']
            value = ratios[row['name']]['median']
            checks.append(dict(target=f'{what} training step >= {TARGETS["train_speed"]}x ConvNeXt-T speed',
                               value=round(value, 3), met=value >= TARGETS['train_speed']))
            if 'memory_ratio' in row:
                value = row['memory_ratio']
                checks.append(dict(target=f'{what} training step <= {TARGETS["train_memory"]}x ConvNeXt-T '
                                          'peak activation memory',
                                   value=round(value, 3), met=value <= TARGETS['train_memory']))
        if args.mode == 'infer' and 'deploy' in rows:
            value = ratios[rows['deploy']['name']]['median']
            checks.append(dict(target=f'{what} inference, deploy form >= {TARGETS["deploy_speed"]}x '
                                      'ConvNeXt-T speed',
                               value=round(value, 3), met=value >= TARGETS['deploy_speed']))
    sweep = result.get('sweep')
    if sweep and args.arch == 't':
        first = {r['name']: r for r in sweep if r['size'] == 224}
        last = {r['name']: r for r in sweep if r['size'] == 1024}
        name = f'Conv2Former-{args.arch}'
        if name in first and name in last:
            value = last[name]['ns_per_pixel'] / first[name]['ns_per_pixel']
            tol = TARGETS['per_pixel_1024_vs_224'] - 1
            checks.append(dict(target=f'cost per pixel at 1024 within {tol:.0%} of that at 224',
                               value=round(value, 3), met=abs(value - 1) <= tol))
    return checks


def plot_sweep(sweep: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r['name'] for r in sweep):
        rows = [r for r in sweep if r['name'] == name]
        mpix = [r['pixels'] / 1e6 for r in rows]
        left.plot(mpix, [r['seconds'] * 1e3 for r in rows], 'o-', label=name)
        right.plot([r['size'] for r in rows], [r['ns_per_pixel'] for r in rows], 'o-', label=name)
    left.set(xlabel='pixels per step (M)', ylabel='ms per step', title='time grows with pixels')
    right.set(xlabel='input side (px)', ylabel='ns per pixel', title='cost per pixel', ylim=(0, None))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', nargs='?', help='time the whole model of this config instead of a backbone')
    parser.add_argument('--arch', default='t', help='Conv2Former variant for a backbone run (default t)')
    parser.add_argument('--input-size', type=int, nargs='+', default=[224], help='H or H W (default 224)')
    parser.add_argument('--batch', type=int, default=8, help='images per step (default 8)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32',
                        help='fp32, or autocast to bf16 / fp16 (fp16 on GPU only)')
    parser.add_argument('--channels-last', action='store_true',
                        help='channels-last input and weights for every model (ours runs NHWC inside anyway)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer',
                        help='inference, or a training step (forward, backward, SGD update)')
    parser.add_argument('--peers', default='convnext',
                        help='comma-separated peers: convnext, reference, deploy (inference: the '
                             'switch_to_deploy() form), store-all (training: recompute=False), '
                             "selective (training: recompute='selective', PyTorch's selective "
                             'checkpointing instead of the explicit backward passes), '
                             "native-off (training: PyTorch's kernels instead of the native "
                             'ones), or none (default convnext)')
    parser.add_argument('--peer-config',
                        help='with a config: time this config\'s model as the ConvNeXt peer (e.g. '
                             'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py)')
    parser.add_argument('--group-pixels', type=int,
                        help='pixels per image group in CPU inference of the deploy form '
                             '(mmconv2former.models.deploy.CPU_GROUP_PIXELS; a huge value turns it off)')
    parser.add_argument('--repeats', type=int, default=7, help='timed repeats per case (default 7)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per case first (default 2)')
    parser.add_argument('--iters', type=int, default=1, help='steps per timed repeat (default 1)')
    parser.add_argument('--no-matmul', action='store_true', help='skip the matmul reference rate')
    parser.add_argument('--memory', action='store_true', help='also measure the peak memory of one step')
    parser.add_argument('--cp-memory', action='store_true',
                        help='only: training-step peak memory of Conv2Former with/without with_cp')
    parser.add_argument('--layout-probe', action='store_true',
                        help='only: time the depthwise convs of each stage channels-last vs NCHW')
    parser.add_argument('--wgrad-probe', action='store_true',
                        help="only: time each stage's depthwise weight gradients, native kernel vs "
                             "PyTorch's, and the MLP's backward pass, native sweep vs PyTorch's operators")
    parser.add_argument('--sweep', type=int, nargs='+', metavar='SIZE',
                        help='square input sizes to sweep (e.g. 224 320 448 640 800 1024)')
    parser.add_argument('--plot', help='PNG for the sweep plot')
    parser.add_argument('--json', help='write all results to this JSON file')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch default)')
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                        help='time by wall clock (default), or by process CPU time: on a shared '
                             'machine with --threads 1 that ignores time spent descheduled')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    args.peers = [] if args.peers in ('', 'none') else [p.strip() for p in args.peers.split(',')]
    unknown = set(args.peers) - {'convnext', 'reference', 'deploy', 'store-all', 'selective',
                                 'native-off'}
    if unknown:
        parser.error(f'unknown peers {sorted(unknown)}; choose from convnext, reference, deploy, '
                     'store-all, selective, native-off, none')
    if args.config and 'reference' in args.peers:
        args.peers.remove('reference')  # the reference is a bare backbone
    if 'deploy' in args.peers and (args.mode == 'train' or args.cp_memory):
        parser.error('the deploy form is for inference only (it refuses training)')
    for peer in ('store-all', 'selective', 'native-off'):
        if peer in args.peers and args.mode != 'train':
            parser.error(f'{peer} differs from the default only in training (--mode train)')
    if args.peer_config and not args.config:
        parser.error('--peer-config needs a config to compare with')
    if args.clock == 'cpu' and args.device != 'cpu':
        parser.error('--clock cpu measures CPU work; use the wall clock on a GPU')
    if args.dtype == 'fp16' and args.device == 'cpu':
        parser.error('fp16 autocast is for GPUs; use bf16 on CPU')
    if len(args.input_size) not in (1, 2):
        parser.error('--input-size takes H or H W')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.group_pixels:
        from mmconv2former.models import deploy
        deploy.CPU_GROUP_PIXELS = args.group_pixels
    if args.device == 'cuda':
        torch.backends.cudnn.benchmark = True
    size = tuple(args.input_size * 2 if len(args.input_size) == 1 else args.input_size)
    result = dict(machine=machine(), settings={k: v for k, v in vars(args).items() if k != 'json'},
                  input_size=list(size))
    print(f'# {result["machine"].get("cpu")}, {result["machine"]["threads"]} threads, '
          f'{result["machine"].get("gpu", "no GPU")}, torch {torch.__version__}, '
          f'load {result["machine"].get("load_avg_1m", float("nan")):.2f}')
    mode = 'train' if args.cp_memory else 'backward' if args.wgrad_probe else args.mode
    print(f'# {args.config or "backbone " + args.arch}, {mode}, batch {args.batch}, '
          f'{size[0]}x{size[1]}, {args.dtype}{", channels-last" if args.channels_last else ""}'
          f'{", torch.compile" if args.compile else ""}, {args.repeats} repeats after {args.warmup} warm-up, '
          f'{args.clock} clock')

    if args.cp_memory:
        mem = cp_memory(args, size)
        result['cp_memory'] = mem
        print(f'training-step peak memory, Conv2Former-{args.arch}, batch {args.batch}, {size[0]}x{size[1]}:')
        for name, label in (('store-all', 'recompute=False'), ('conv2former', 'recompute=True (default)'),
                            ('with_cp', 'with_cp=True')):
            ratio = mem[name]['peak_bytes'] / mem['store-all']['peak_bytes']
            print(f'  {label:<26} {mem[name]["peak_bytes"] / 2**20:9.1f} MB  {ratio:.2f}x')
    elif args.layout_probe or args.wgrad_probe:
        key, what = (('layout_probe', 'depthwise conv') if args.layout_probe
                     else ('wgrad_probe', 'depthwise weight gradient'))
        rows = layout_probe(args, size) if args.layout_probe else wgrad_probe(args, size)
        print(f'{what + " (batch " + str(args.batch) + ")":<52} {"ms":>8}')
        for r in rows:
            print(f'{r["name"]:<52} {r["ms"]:8.3f}')
        result[key] = rows
    elif args.sweep:
        sweep = []
        for side in args.sweep:
            cases = backbone_cases(args, (side, side), args.batch)
            run_interleaved(cases, args.repeats, args.warmup, args.iters, args.device, args.clock)
            for case in cases:
                row = summarise(case)
                row.update(size=side, pixels=case.pixels, seconds=statistics.median(row['seconds']))
                sweep.append(row)
            del cases
        base = {r['name']: r['ns_per_pixel'] for r in sweep if r['size'] == args.sweep[0]}
        print(f'{"model":<34} {"size":>5} {"ms/step":>9} {"ns/pixel":>9} {"vs " + str(args.sweep[0]):>7} '
              f'{"cpu/wall":>8}')
        for r in sweep:
            print(f'{r["name"]:<34} {r["size"]:5d} {r["seconds"] * 1e3:9.1f} {r["ns_per_pixel"]:9.2f} '
                  f'{r["ns_per_pixel"] / base[r["name"]]:7.3f} {r["cpu_per_wall"]:8.2f}')
        result['sweep'] = sweep
        if args.plot:
            plot_sweep(sweep, args.plot)
            print(f'plot: {args.plot}')
    else:
        cases = config_cases(args, size, args.batch) if args.config else backbone_cases(args, size, args.batch)
        timed = cases + ([] if args.no_matmul else [matmul_case(args.device)])
        run_interleaved(timed, args.repeats, args.warmup, args.iters, args.device, args.clock)
        rows = [summarise(c) for c in cases]
        # Everything relative to the ConvNeXt peer when there is one.
        base = next((i for i, c in enumerate(cases) if c.key == 'convnext'), 0)
        ratios = {c.name: paired_ratio(c, cases[base]) for c in cases}
        matmul = None if args.no_matmul else summarise(timed[-1])
        if args.memory:
            for case, row in zip(cases, rows):
                row['peak_bytes'] = peak_memory(case.step, args.device)
            for row in rows:
                row['memory_ratio'] = row['peak_bytes'] / rows[base]['peak_bytes']
        print_table(rows, ratios, matmul, args.memory, cases[base].name)
        result.update(throughput=rows, ratios=ratios, matmul=matmul)

    checks = check_targets(args, result)
    if checks:
        print('targets:')
        for c in checks:
            print(f'  [{"met" if c["met"] else "NOT met"}] {c["target"]}: {c["value"]}')
        result['targets'] = checks
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
        print(f'json: {args.json}')
    return result


if __name__ == '__main__':
    main()
