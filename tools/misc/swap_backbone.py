"""Swap the backbone of any mmdet / mmseg / mmpretrain / mmpose / mmaction2
config for Conv2Former.

    python tools/misc/swap_backbone.py SRC --arch t -o DST [--pretrained CKPT] [--layer-decay RATE] [--check]

SRC is a config path or ``mmdet::...``, ``mmseg::...``, ``mmpretrain::...``,
``mmpose::...``, ``mmaction::...`` (e.g.
``mmdet::retinanet/retinanet_r50_fpn_1x_coco.py``,
``mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_res50_8xb64-210e_coco-256x192.py``,
``mmaction::recognition/tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb.py``).
DST is written as a short delta over SRC (``_base_ = SRC``) whose header says
what changed:

* the backbone (``_delete_=True``), with one output per source output at the
  same stride: the source backbone is built and run on a random image to
  learn its outputs' channels and strides, so any registered backbone works
  (CSPNeXt's stage numbering, ResNet with ``out_indices=(1, 2, 3)`` ...). A
  dilated segmentation backbone (strides 4, 8, 8, 8) maps to stages 0-3 in
  order, as mmseg's ``-d32`` configs;
* the channel arguments of exactly the modules that read the backbone: the
  neck when there is one, otherwise the heads (``in_channels`` with its
  ``in_index``, ``c1_in_channels``, nested ones). A neck without channel
  arguments (pooling, mmpose's ``FeatureMapProcessor``) is run on maps of
  both widths to learn what the heads behind it read. RTMPose's
  ``in_featuremap_size`` is checked against its input size and the stride;
* mmpose: a single high-resolution output (HRNet's stride 4) gets
  Conv2Former's later stages concatenated to it by ``FeatureMapProcessor``
  (HRNetV2's representation); a dilated backbone is refused (the codec's
  heatmap size is tied to the stride);
* mmaction2: 2D recognizers only (``format_shape='NCHW'``: the backbone sees
  the N*T frames of a batch of clips); 3D backbones are refused. The type is
  ``mmpretrain.Conv2Former``, for which Recognizer2D unpacks the tuple of
  outputs;
* the data preprocessor's mean/std and RGB order (Conv2Former's ImageNet
  statistics); mmseg's ``model.pretrained`` and ``load_from``, which name the
  old backbone's weights;
* with ``--pretrained``, the backbone's ``init_cfg`` with the prefix the
  checkpoint's keys carry; with ``--layer-decay``, our layer-decay optimiser
  constructor (mmdet's and mmseg's accept only ConvNeXt, and are replaced
  whenever SRC uses them).

Where the tool cannot see how the backbone's outputs are consumed it stops,
names each problem and what to set by hand, and writes nothing. An existing
DST is never overwritten without ``--force``.

``--check`` then builds the swapped model on the CPU, runs one training step
of its optimiser and one prediction on a synthetic batch (pose: one person
crop at the codec's input size with targets from mmpose's own
``GenerateTarget``; action: clips of frames), and prints the loss, the
parameter count and the FLOPs.
"""
import argparse
import os
import os.path as osp
import sys
import time
from typing import Optional, Sequence

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)  # run from a checkout
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see tests/conftest.py

from mmconv2former.models import Conv2Former  # noqa: E402
from mmconv2former.swap import SwapError, check_config, swap_backbone  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='config path, or mmdet::..., mmseg::..., mmpretrain::..., mmpose::..., '
                        'mmaction::...')
    parser.add_argument('--arch', required=True, choices=sorted(Conv2Former.arch_settings),
                        help='Conv2Former variant')
    parser.add_argument('-o', '--out', required=True, help='the delta config to write (.py)')
    parser.add_argument('--pretrained', metavar='CKPT',
                        help='Conv2Former weights for the backbone (release file or converted)')
    parser.add_argument('--layer-decay', type=float, metavar='RATE',
                        help='layer-wise lr decay rate, e.g. 0.95 (LayerDecayOptimWrapperConstructor)')
    parser.add_argument('--drop-path-rate', type=float,
                        help='stochastic depth (default: our configs\' rate for the arch)')
    parser.add_argument('--force', action='store_true', help='overwrite an existing output file')
    parser.add_argument('--check', action='store_true',
                        help='build the result, train one step and predict on a synthetic batch (CPU)')
    parser.add_argument('--check-size', type=int, default=224,
                        help='image side for --check (raised for DETR-style detectors; a pose codec '
                        'sets its own). Default 224')
    return parser.parse_args(argv)


def human(value: float) -> str:
    return f'{value / 1e9:.2f}G' if value >= 1e9 else f'{value / 1e6:.2f}M'


def run_check(path: str, size: int) -> dict:
    start = time.perf_counter()
    result = check_config(path, size=size)
    h, w = result['shape']
    unit = 'clips' if result['library'] == 'mmaction' else 'images'
    print(f'check: one training step (loss {result["loss"]:.4f}) and one prediction on 2 synthetic '
          f'{h}x{w} {unit} passed in {time.perf_counter() - start:.1f} s')
    print(f'params: {human(result["params"])} ({human(result["backbone_params"])} in the backbone)')
    if result['library'] not in ('mmdet', 'mmseg', 'mmpretrain'):
        print('FLOPs: not counted (tools/analysis/get_flops.py counts mmdet, mmseg and mmpretrain models)')
        return result
    try:
        sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
        from get_flops import config_complexity
        flops, _, shape = config_complexity(path, (h, w))
        result['flops'] = flops
        print(f'FLOPs: {human(flops)} multiply-adds at {shape[0]}x{shape[1]} '
              '(tools/analysis/get_flops.py CONFIG --shape H W for other sizes)')
    except Exception as exc:  # noqa: BLE001  (FLOP counting traces the model; some do not trace)
        print(f'FLOPs: not counted ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})')
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = swap_backbone(args.src, args.arch, args.out, pretrained=args.pretrained,
                               layer_decay=args.layer_decay, drop_path_rate=args.drop_path_rate,
                               force=args.force)
    except (SwapError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print(f'wrote {result.dst}:')
    print(result.text)
    if args.check:
        run_check(result.dst, args.check_size)
    return 0


if __name__ == '__main__':
    sys.exit(main())
