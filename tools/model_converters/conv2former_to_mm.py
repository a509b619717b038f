"""Convert an official Conv2Former checkpoint to an OpenMMLab checkpoint.

    python tools/model_converters/conv2former_to_mm.py SRC DST [--ema] [--for {cls,det,seg}]
                                                       [--arch NAME] [--force]

SRC is a file of the authors' release (a timm checkpoint: ``state_dict``,
optionally ``state_dict_ema``, ``optimizer``, ``args``, ...). DST receives
``{'state_dict': ..., 'meta': ...}``:

* ``--for cls`` (default): the whole classifier for mmpretrain
  (``backbone.*``, ``neck.proj|norm.*`` from the release's ``head.0|2``,
  ``head.fc.*`` from ``pred``), for ``load_from``, ``tools/test.py`` or
  ``ImageClassificationInferencer(pretrained=DST)``;
* ``--for det`` / ``--for seg``: only ``backbone.*``, for a detector's or
  segmentor's ``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.

Before writing, the variant is read off the tensor shapes and every tensor is
checked against it (a truncated file, or one that is not Conv2Former, is
refused); ``--arch`` additionally insists on a variant. Dropped keys and
entries are listed. SRC is read with the package's allow-listed loader: a file
whose pickle names anything beyond what the release needs is refused before
any of it runs. DST is never overwritten without ``--force``.
"""
import argparse
import os
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # run from a checkout

from mmconv2former import __version__  # noqa: E402
from mmconv2former.checkpoint import (CheckpointMismatchError, UnsafeCheckpointError,  # noqa: E402
                                      arch_name, check_shapes, extract_state_dict, infer_arch,
                                      safe_load)
from mmconv2former.models import Conv2Former  # noqa: E402
from mmconv2former.models.classifier import (RELEASE_HEAD_KEYS, Conv2FormerNeck,  # noqa: E402
                                             release_to_mm)


def expected_release_state(arch: dict, num_classes: Optional[int]) -> Dict[str, torch.Tensor]:
    """Every key a release file of ``arch`` holds, with a tensor of its shape.

    Blocks of a stage have identical shapes, so a one-block-per-stage model is
    built and its block keys are repeated: exact, and cheap even for L.
    """
    template = Conv2Former(dict(arch, depths=[1] * len(arch['depths'])), out_norm=False).state_dict()
    expected: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in template.items():
        match = re.match(r'stages\.(\d+)\.0\.(.+)', key)
        if match is None:
            expected[key] = value
            continue
        stage, rest = int(match.group(1)), match.group(2)
        for block in range(arch['depths'][stage]):
            expected[f'stages.{stage}.{block}.{rest}'] = value
    if num_classes is not None:
        to_release = {mm: release for release, mm in RELEASE_HEAD_KEYS.items()}
        neck = Conv2FormerNeck(arch['channels'][-1])
        for key, value in neck.state_dict().items():
            module, param = key.split('.', 1)
            expected[to_release[f'neck.{module}.'] + param] = value
        expected['pred.weight'] = torch.empty(num_classes, neck.out_channels)
        expected['pred.bias'] = torch.empty(num_classes)
    return expected


def describe(arch: dict) -> str:
    return (f"channels={list(arch['channels'])}, depths={list(arch['depths'])}, "
            f"kernel_size={arch['kernel_size']}")


def validate(state: Dict[str, torch.Tensor], arch: Optional[str] = None) -> dict:
    """Read the variant off the tensors and check every tensor against it.

    Returns a dict with ``arch`` (settings), ``name`` (variant name or None)
    and ``num_classes`` (None without a classifier). Raises
    :class:`CheckpointMismatchError` for a different variant than ``arch``,
    missing or extra blocks, or a tensor of the wrong shape.
    """
    found = infer_arch(state)
    name = arch_name(found, Conv2Former.arch_settings)
    if arch is not None:
        wanted = Conv2Former.parse_arch(arch)
        if arch_name(found, {arch: wanted}) is None:
            raise CheckpointMismatchError(
                f'expected Conv2Former-{arch} ({describe(wanted)}) but the checkpoint holds '
                f"{'Conv2Former-' + name if name else 'an unreleased variant'} ({describe(found)}); "
                'pick the matching --arch (or leave it out)')
    num_classes = int(state['pred.weight'].shape[0]) if 'pred.weight' in state else None
    expected = expected_release_state(found, num_classes)
    hint = f"The checkpoint's stem and stage widths say {describe(found)}."
    check_shapes(expected, state, hint)
    optional_head = tuple(RELEASE_HEAD_KEYS) if num_classes is None else ()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and not k.startswith(optional_head)]
    if missing or extra:
        raise CheckpointMismatchError(
            f'the tensors do not form a Conv2Former ({describe(found)}): '
            f'missing {missing[:5]}{" ..." if len(missing) > 5 else ""}, '
            f'unexpected {extra[:5]}{" ..." if len(extra) > 5 else ""}. Is the file complete?')
    return dict(arch=found, name=name, num_classes=num_classes)


def convert(src: str, dst: str, task: str = 'cls', use_ema: bool = False,
            arch: Optional[str] = None, force: bool = False) -> dict:
    """Convert ``src`` into ``dst``; returns a summary (also what is printed)."""
    if task not in ('cls', 'det', 'seg'):
        raise ValueError(f"--for must be 'cls', 'det' or 'seg', got {task!r}")
    if osp.exists(dst):
        if osp.exists(src) and osp.samefile(src, dst):
            raise FileExistsError(f'DST {dst!r} is the source file; choose another path')
        if not force:
            raise FileExistsError(f'DST {dst!r} exists; pass --force to overwrite it')
    checkpoint = safe_load(src)
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    info = validate(state, arch)
    if task == 'cls' and info['num_classes'] is None:
        raise CheckpointMismatchError(
            f'{src!r} has no classifier (head.*, pred.*); convert it with --for det or --for seg')
    converted, dropped = release_to_mm(state, task)

    weights = 'state_dict_ema' if use_ema else 'state_dict'
    dropped_entries: List[str] = sorted(k for k in checkpoint if k != weights) \
        if isinstance(checkpoint, dict) and weights in checkpoint else []
    meta = dict(converted_from=osp.basename(src), weights=weights, task=task,
                arch=info['name'] or {k: list(v) if isinstance(v, (list, tuple)) else v
                                      for k, v in info['arch'].items()},
                num_classes=info['num_classes'] if task == 'cls' else None,
                mmconv2former_version=__version__)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    partial = dst + '.partial'
    torch.save(dict(meta=meta, state_dict=converted), partial)
    os.replace(partial, dst)  # never leave a half-written DST behind
    return dict(src=src, dst=dst, task=task, weights=weights, variant=info['name'],
                arch=info['arch'], num_classes=info['num_classes'], kept=len(converted),
                dropped_keys=dropped, dropped_entries=dropped_entries)


def report(summary: dict) -> str:
    variant = f"Conv2Former-{summary['variant']}" if summary['variant'] else 'unreleased variant'
    classes = f", {summary['num_classes']} classes" if summary['num_classes'] else ''
    lines = [f"{summary['src']}: {variant} ({describe(summary['arch'])}){classes}",
             f"  weights: {summary['weights']}",
             f"  wrote {summary['kept']} tensors for {summary['task']} to {summary['dst']}"]
    if summary['dropped_keys']:
        lines.append(f"  dropped {len(summary['dropped_keys'])} classifier tensors: "
                     f"{', '.join(summary['dropped_keys'])}")
    if summary['dropped_entries']:
        lines.append(f"  dropped entries: {', '.join(summary['dropped_entries'])}")
    if summary['variant'] is None:
        lines.append("  note: not a released variant; build it with backbone.arch=dict("
                     f"{describe(summary['arch'])})")
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help="a release checkpoint (.pth.tar / .pth)")
    parser.add_argument('dst', help='output mm checkpoint (.pth)')
    parser.add_argument('--ema', action='store_true', help='convert state_dict_ema instead of state_dict')
    parser.add_argument('--for', dest='task', choices=['cls', 'det', 'seg'], default='cls',
                        help='cls: whole classifier (mmpretrain); det/seg: backbone.* only. Defaults to cls')
    parser.add_argument('--arch', choices=sorted(Conv2Former.arch_settings),
                        help='refuse the file unless it is this variant')
    parser.add_argument('--force', action='store_true', help='overwrite DST if it exists')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        summary = convert(args.src, args.dst, args.task, args.ema, args.arch, args.force)
    except (FileExistsError, FileNotFoundError, KeyError, CheckpointMismatchError,
            UnsafeCheckpointError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise SystemExit(f'conv2former_to_mm: error: {message}') from None
    print(report(summary))
    return summary


if __name__ == '__main__':
    main()
