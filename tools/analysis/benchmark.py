"""Speed and peak memory of Conv2Former next to its peers, measured in one process.

    # backbone training step (forward, backward, AdamW) against the ConvNeXt of
    # matching size, with peak memory; recompute=False and with_cp=True beside
    python tools/analysis/benchmark.py --arch t --mode train --batch 8 --memory \\
        --peers convnext,recompute-off,with-cp
    # inference, the trained form and its switch_to_deploy() form, bf16 on a GPU
    python tools/analysis/benchmark.py --arch t --mode inference --batch 64 \\
        --switch-to-deploy --dtype bf16 --channels-last --device cuda
    # a whole model from a config against another config's model (mmdet,
    # mmseg or mmpretrain; synthetic images and targets)
    python tools/analysis/benchmark.py configs/mask_rcnn/mask-rcnn_conv2former-t_fpn_1x_coco.py \\
        --mode train --batch 2 --input-size 512 --memory \\
        --peer-config mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py
    # how the cost per pixel grows with the input side
    python tools/analysis/benchmark.py --arch t --batch 1 --sweep 224 512 1024

How it measures: every case runs in the same process; each repeat times every
case once, in an order rotated from repeat to repeat, so that a noisy neighbour
or a clock change hits all cases alike. Speed is images per second (median,
min-max over the repeats); each row's speed ratio to the base case (the
ConvNeXt, or ``--peer-config``'s model, else Conv2Former itself) is the median
of the per-repeat ratios. ``--memory`` adds the
peak of tensor memory allocated during one step above what was live before it
(weights, optimiser state, inputs): ``torch.cuda.max_memory_allocated`` on a
GPU, every allocation that ``torch.profiler`` records on a CPU. The ConvNeXt is
mmpretrain's where it is installed, else timm's; the output says which. A fixed
suite for GPUs (bf16/fp16, eager/compiled, 224 and 1024 pixels, correctness
checks) is ``tools/analysis/gpu_benchmark.py``.
"""
import argparse
import json
import os.path as osp
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # run from a checkout

from mmconv2former.engine.profiling import (DTYPES, MEMORY_PEERS, Case, build_models,  # noqa: E402
                                            conv2former_name, describe, machine, make_step, paired_ratio,
                                            peak_memory, summarise, time_interleaved)
from mmconv2former.models import Conv2Former  # noqa: E402

PEERS = ('convnext', *MEMORY_PEERS)


# ---------------------------------------------------------------------------- cases
def prepare(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``model`` on the device, channels-last if asked, compiled if asked."""
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, dynamic=False) if args.compile else model


def backbone_cases(args: argparse.Namespace, size: Tuple[int, int]) -> List[Case]:
    x = torch.randn(args.batch, 3, *size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Conv2Former and its variants first, the ConvNeXt last.
    keys = (['conv2former'] + [p for p in args.peers if p != 'convnext']
            + (['deploy'] if args.switch_to_deploy else []) + [p for p in args.peers if p == 'convnext'])
    return [Case(label, make_step(prepare(model, args), x, args.mode == 'train', args.dtype), args.batch, key)
            for key, label, model in build_models(keys, args.arch, convnext=args.convnext)]


def load_model_config(path: str, size: int):
    """The model config of ``path`` (a file or ``mmdet::...``), its library,
    and a preprocessor that pads to ``size`` rather than the recipe's crop."""
    from mmengine.config import Config

    from mmconv2former.engine.runtime import detect_library
    from mmconv2former.swap import resolve_config
    cfg = Config.fromfile(resolve_config(path))
    library = detect_library(cfg)
    model_cfg = cfg.model
    if cfg.get('data_preprocessor') is not None:  # what mmengine's Runner does with a top-level one
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    pre = model_cfg.get('data_preprocessor')
    if isinstance(pre, dict):
        pre.pop('batch_augments', None)  # random resizes and fixed pads: not what is timed here
        if pre.get('size') is not None:
            pre['size'] = (size, size)
    return model_cfg, library


def config_cases(args: argparse.Namespace, size: Tuple[int, int]) -> List[Case]:
    """The whole model of ``args.config`` (and its variants) and of
    ``--peer-config``, on a synthetic batch through each model's own data
    preprocessor. Training runs ``mode='loss'`` and the configs' summed
    losses; inference runs ``mode='tensor'`` (the networks, without the
    post-processing, which does not depend on the backbone). Weights are
    not initialised (no checkpoint is read): speed does not depend on them."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    from mmconv2former.engine.runtime import library_models, synthetic_batch
    if size[0] != size[1]:
        raise ValueError('a config runs on square images: give --input-size once')
    variants = [('conv2former', osp.basename(args.config), args.config, {})]
    variants += [(key, f'{osp.basename(args.config)} {key}', args.config, MEMORY_PEERS[key])
                 for key in args.peers]
    if args.switch_to_deploy:
        variants.append(('deploy', f'{osp.basename(args.config)} switch_to_deploy()', args.config, {}))
    if args.peer_config:
        variants.append(('peer', osp.basename(args.peer_config), args.peer_config, {}))
    cases, first_library = [], None
    training = args.mode == 'train'
    for key, label, path, backbone_args in variants:
        model_cfg, library = load_model_config(path, size[0])
        first_library = first_library or library
        if library != first_library:
            raise ValueError(f'{path} is a {library} config, {args.config} a {first_library} one')
        if backbone_args:
            if not str(model_cfg.backbone.get('type', '')).endswith('Conv2Former'):
                raise ValueError(f'{key} needs a Conv2Former backbone; {path} has {model_cfg.backbone.type}')
            model_cfg.backbone.update(backbone_args)
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope(library):
            model = revert_sync_batchnorm(library_models(library).build(model_cfg))
            if key == 'deploy':
                for module in model.modules():
                    if isinstance(module, Conv2Former):
                        module.eval().switch_to_deploy()
            model = model.to(args.device)
            data = model.data_preprocessor(synthetic_batch(model_cfg, library, size[0], args.batch), training)
        inputs, samples = data['inputs'], data['data_samples']
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        net = prepare(model, args)
        if training:
            step = make_step(net, inputs, True, args.dtype, lambda losses, model=model: model.parse_losses(losses)[0],
                             data_samples=samples, mode='loss')
        else:
            step = make_step(net, inputs, False, args.dtype, data_samples=samples, mode='tensor')
        cases.append(Case(label, step, args.batch, key))
    return cases


# ---------------------------------------------------------------------------- measuring
def measure(cases: List[Case], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Time ``cases`` interleaved (and their peak memory); one row each, with
    the speed and memory relative to the peer (ConvNeXt or ``--peer-config``),
    or to the first case when there is none."""
    time_interleaved(cases, args.repeats, args.warmup, args.iters, args.device, args.clock)
    base = next((c for c in cases if c.key in ('convnext', 'peer')), cases[0])
    rows = []
    for case in cases:
        row = summarise(case)
        row['speed_vs_base'] = paired_ratio(case, base)
        if args.memory:
            row['peak_mb'] = peak_memory(case.step, args.device) / 2 ** 20
        rows.append(row)
    for row in rows:
        row['base'] = base.name
        if args.memory:
            row['memory_vs_base'] = row['peak_mb'] / rows[cases.index(base)]['peak_mb']
    return rows


def print_rows(rows: List[Dict[str, Any]], memory: bool) -> None:
    width = max(40, *(len(r['name']) + 1 for r in rows))
    head = f'{"model":<{width}} {"img/s":>9} {"(min-max)":>17} {"ms/step":>9}  {"speed vs " + rows[0]["base"]:<26}'
    if memory:
        head += f' {"peak MB":>9} {"memory":>7}'
    print(head.rstrip())
    print('-' * len(head.rstrip()))
    for r in rows:
        speed = r['speed_vs_base']
        spread = f'({r["min"]:.2f}-{r["max"]:.2f})'
        ratio = f'{speed["median"]:.2f}x ({speed["min"]:.2f}-{speed["max"]:.2f})'
        line = f'{r["name"]:<{width}} {r["img_per_s"]:9.2f} {spread:>17} {r["ms_per_step"]:9.1f}  {ratio:<26}'
        if memory:
            line += f' {r["peak_mb"]:9.1f} {r["memory_vs_base"]:6.2f}x'
        print(line.rstrip())


def sweep(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The backbone cases at each ``--sweep`` side: time per step and per
    pixel, and the cost per pixel relative to the first side."""
    rows = []
    for side in args.sweep:
        cases = backbone_cases(args, (side, side))
        time_interleaved(cases, args.repeats, args.warmup, args.iters, args.device, args.clock)
        for case in cases:
            seconds = statistics.median(s['seconds'] for s in case.samples)
            rows.append(dict(name=case.name, size=side, ms_per_step=1e3 * seconds,
                             ns_per_pixel=1e9 * seconds / (args.batch * side * side)))
        del cases
    first = {r['name']: r['ns_per_pixel'] for r in rows if r['size'] == args.sweep[0]}
    print(f'{"model":<40} {"side":>5} {"ms/step":>9} {"ns/pixel":>9} {"vs " + str(args.sweep[0]):>8}')
    for r in rows:
        r['per_pixel_vs_first'] = r['ns_per_pixel'] / first[r['name']]
        print(f'{r["name"]:<40} {r["size"]:5d} {r["ms_per_step"]:9.1f} {r["ns_per_pixel"]:9.2f} '
              f'{r["per_pixel_vs_first"]:7.2f}x')
    return rows


# ---------------------------------------------------------------------------- main
def arch_arg(text: str):
    """An arch name, or a JSON dict (``{"channels": [...], ...}``)."""
    return json.loads(text) if text.lstrip().startswith('{') else text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', nargs='?', help="time this config's whole model instead of a backbone")
    parser.add_argument('--arch', default='t', type=arch_arg,
                        help='Conv2Former variant of a backbone run: n, t, s, b, b_22k, l (default t), or a '
                             'JSON dict with channels, depths, kernel_size (the ConvNeXt peer then has '
                             'the same channels and depths)')
    parser.add_argument('--mode', choices=['train', 'inference'], default='inference',
                        help='a training step (forward, backward, AdamW) or inference (default)')
    parser.add_argument('--batch', type=int, default=8, help='images per step (default 8)')
    parser.add_argument('--input-size', type=int, nargs='+', default=[224], metavar='SIDE',
                        help='H, or H W (default 224)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32',
                        help='fp32 (default), or autocast to bf16 or fp16 (fp16 training with a GradScaler)')
    parser.add_argument('--channels-last', action='store_true', help='channels-last input and weights')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--peers', default=None,
                        help='comma-separated: convnext (the ConvNeXt of matching size), '
                             'recompute-off (recompute=False: every activation stored), '
                             "recompute-modulation (recompute='modulation': the modulation's 1x1 "
                             'products recomputed too), with-cp (with_cp=True: only block inputs '
                             'stored), or none. Default: convnext '
                             'for a backbone, none for a config')
    parser.add_argument('--switch-to-deploy', action='store_true',
                        help='inference: also time the switch_to_deploy() form')
    parser.add_argument('--peer-config', help="with a config: time this config's model too and compare "
                        'with it (e.g. mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py)')
    parser.add_argument('--convnext', choices=['auto', 'mmpretrain', 'timm'], default='auto',
                        help="whose ConvNeXt is the peer: mmpretrain's where installed, else timm's (default auto)")
    parser.add_argument('--memory', action='store_true', help='also measure the peak memory of one step')
    parser.add_argument('--sweep', type=int, nargs='+', metavar='SIDE',
                        help='backbone: time square inputs of these sides instead (cost per pixel)')
    parser.add_argument('--repeats', type=int, default=7, help='timed repeats of every case (default 7)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps of every case first (default 2)')
    parser.add_argument('--iters', type=int, default=1, help='steps per timed repeat (default 1)')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                        help='wall clock (default), or process CPU time: on a shared machine with '
                             '--threads 1 that ignores time spent descheduled')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', metavar='PATH', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.peers is None:
        args.peers = [] if args.config else ['convnext']
    else:
        args.peers = [] if args.peers == 'none' else [p.strip() for p in args.peers.split(',') if p.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        parser.error(f'unknown peers {unknown}; choose from {", ".join(PEERS)} or none')
    if args.config and 'convnext' in args.peers:
        parser.error('with a config, compare with a ConvNeXt model through --peer-config')
    if args.peer_config and not args.config:
        parser.error('--peer-config needs a config to compare with')
    if args.mode == 'inference' and set(args.peers) & set(MEMORY_PEERS):
        parser.error(f'{sorted(set(args.peers) & set(MEMORY_PEERS))} differ from the default only in '
                     'training (--mode train)')
    if args.switch_to_deploy and args.mode == 'train':
        parser.error('the switch_to_deploy() form is for inference only')
    if args.sweep and args.config:
        parser.error('--sweep times a backbone; drop the config')
    if args.clock == 'cpu' and args.device != 'cpu':
        parser.error('--clock cpu measures CPU work; time a GPU by the wall clock')
    if len(args.input_size) not in (1, 2):
        parser.error('--input-size takes H, or H W')
    if min(args.repeats, args.iters) < 1 or args.warmup < 0:
        parser.error('--repeats and --iters must be at least 1, --warmup at least 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    saved_cudnn_benchmark = torch.backends.cudnn.benchmark
    if torch.device(args.device).type == 'cuda':
        torch.backends.cudnn.benchmark = True
    try:
        return run(args)
    finally:
        torch.backends.cudnn.benchmark = saved_cudnn_benchmark


def run(args: argparse.Namespace) -> Dict[str, Any]:
    size = tuple(args.input_size * 2 if len(args.input_size) == 1 else args.input_size)
    result: Dict[str, Any] = dict(machine=machine(),
                                  settings={k: v for k, v in vars(args).items() if k != 'json'})
    print(f'# {describe(result["machine"])}')
    what = args.config or f'backbone {conv2former_name(args.arch)}'
    shape = 'sides ' + ' '.join(map(str, args.sweep)) if args.sweep else f'{size[0]}x{size[1]}'
    print(f'# {what}, {args.mode}, batch {args.batch}, {shape}, {args.dtype}'
          f'{", channels-last" if args.channels_last else ""}{", torch.compile" if args.compile else ""}; '
          f'{args.repeats} repeats after {args.warmup} warm-up steps, {args.clock} clock', flush=True)
    if args.sweep:
        result['sweep'] = sweep(args)
    else:
        cases = config_cases(args, size) if args.config else backbone_cases(args, size)
        result['rows'] = measure(cases, args)
        print_rows(result['rows'], args.memory)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
        print(f'# results: {args.json}')
    return result


if __name__ == '__main__':
    main()
