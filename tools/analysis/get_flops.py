"""Parameters and FLOPs of a Conv2Former classifier, detector or segmentor.

    python tools/analysis/get_flops.py CONFIG [--shape H [W]] [--cfg-options k=v ...]
    python tools/analysis/get_flops.py --arch n t s b l [--shape 224] [--backbone-only]

With a config (mmpretrain, mmdet or mmseg; the library comes from its
``default_scope``) the model is built as training would build it and a random
image of the given size goes through its data preprocessor and its
``mode='tensor'`` forward: the whole classifier (head included), the whole
two-stage detector, the segmentor without its training-only auxiliary head.
With ``--arch`` the release's classifier (backbone + 1280-wide head, 1000
classes) is counted, or with ``--backbone-only`` the bare backbone.

FLOPs are multiply-adds (one multiply-add counts 1), counted by
:mod:`mmengine.analysis` on the traced graph. Elementwise operations
(activations, residual sums, the modulation product) are not counted, and by
default neither are LayerNorms: the release's channel LayerNorm is written as
elementwise tensor maths that FLOP counters do not see, so its published table
leaves every LayerNorm out; our fused ``F.layer_norm`` would otherwise add
0.2-0.3 % (``--count-layer-norm`` includes it). BatchNorm is counted, as in
the release. This reproduces the release's table (see configs/conv2former/README.md).
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # run from a checkout

from mmconv2former.models import Conv2Former  # noqa: E402


def classifier_cfg(arch, num_classes: int = 1000) -> dict:
    """The model dict of configs/conv2former/*_in1k.py for ``arch``."""
    channels = Conv2Former.parse_arch(arch)['channels']
    return dict(
        type='ImageClassifier',
        backbone=dict(type='Conv2Former', arch=arch, out_indices=(3, ), out_norm=False),
        neck=dict(type='Conv2FormerNeck', in_channels=channels[-1]),
        head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=1280))


class _TensorForward(nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-argument module to trace."""

    def __init__(self, model: nn.Module, data_samples: Optional[list]) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def count(model: nn.Module, inputs: Tuple, count_layer_norm: bool = False) -> Tuple[int, int]:
    """``(flops, params)`` of ``model(*inputs)``; FLOPs are multiply-adds."""
    from mmengine.analysis import FlopAnalyzer, parameter_count
    analyzer = FlopAnalyzer(model, inputs)
    if not count_layer_norm:
        # a zero-count handle: ``None`` would only add it to the ignored ops,
        # which mmengine consults after its default handles
        analyzer.set_op_handle('aten::layer_norm', lambda inputs, outputs: 0)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        flops = analyzer.total()
    return int(flops), int(parameter_count(model)[''])


def parse_shape(shape: Sequence[int]) -> Tuple[int, int]:
    if len(shape) == 1:
        return int(shape[0]), int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    raise ValueError(f'--shape takes H or H W, got {list(shape)}')


def arch_complexity(arch, shape: Tuple[int, int] = (224, 224), backbone_only: bool = False,
                    num_classes: int = 1000, count_layer_norm: bool = False) -> Tuple[int, int]:
    """``(flops, params)`` of the release classifier (or backbone) for ``arch``."""
    if backbone_only:
        model = Conv2Former(arch, out_norm=False)
        forward = model
    else:
        import mmpretrain.models  # noqa: F401  (ImageClassifier, LinearClsHead)
        from mmengine.registry import DefaultScope
        from mmpretrain.registry import MODELS
        # build in mmpretrain's scope whatever scope the caller left current
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            model = MODELS.build(classifier_cfg(arch, num_classes))
        forward = _TensorForward(model, None)
    model.eval()
    return count(forward, (torch.randn(1, 3, *shape), ), count_layer_norm)


def config_complexity(path: str, shape: Tuple[int, int], cfg_options: Optional[dict] = None,
                      count_layer_norm: bool = False) -> Tuple[int, int, Tuple[int, int]]:
    """``(flops, params, input_shape)`` of the model a config builds.

    ``input_shape`` is what reaches the network after the data preprocessor
    (e.g. padded to a multiple of 32 by a detector's).
    """
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    from mmconv2former.engine.runtime import detect_library, library_models

    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    library = detect_library(cfg)
    registry = library_models(library)
    h, w = shape
    meta = dict(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0))
    with DefaultScope.overwrite_default_scope(library):
        model = revert_sync_batchnorm(registry.build(cfg.model)).eval()
        samples = None
        if library == 'mmdet':
            from mmdet.structures import DetDataSample
            samples = [DetDataSample(metainfo=meta)]
        elif library == 'mmseg':
            from mmseg.structures import SegDataSample
            samples = [SegDataSample(metainfo=meta)]
            model.auxiliary_head = None  # training-only
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        data = model.data_preprocessor(dict(inputs=[image], data_samples=samples), training=False)
        inputs = data['inputs']
        samples = data['data_samples'] if library != 'mmpretrain' else None  # a classifier needs none
        flops, params = count(_TensorForward(model, samples), (inputs, ), count_layer_norm)
    return flops, params, tuple(inputs.shape[-2:])


def human(value: float) -> str:
    return f'{value / 1e9:.1f}G' if value >= 1e9 else f'{value / 1e6:.1f}M'


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', nargs='?', help='a config file (mmpretrain, mmdet or mmseg)')
    parser.add_argument('--arch', nargs='+', help=f'variants, any of {sorted(Conv2Former.arch_settings)}')
    parser.add_argument('--shape', type=int, nargs='+', default=[224],
                        help='input size: H or H W (default 224)')
    parser.add_argument('--backbone-only', action='store_true', help='with --arch: the backbone alone')
    parser.add_argument('--num-classes', type=int, default=1000, help='with --arch: classifier width')
    parser.add_argument('--count-layer-norm', action='store_true',
                        help='also count LayerNorms (the release table does not)')
    parser.add_argument('--cfg-options', nargs='+', default=None, metavar='KEY=VALUE',
                        help='override config entries')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.arch is None):
        parser.error('give a CONFIG or --arch, not both')
    shape = parse_shape(args.shape)

    rows = []
    if args.arch:
        what = 'backbone' if args.backbone_only else f'classifier ({args.num_classes} classes)'
        for arch in args.arch:
            flops, params = arch_complexity(arch, shape, args.backbone_only, args.num_classes,
                                            args.count_layer_norm)
            rows.append(dict(model=f'Conv2Former-{arch} {what}', shape=shape, params=params, flops=flops))
    else:
        options = None
        if args.cfg_options:
            from mmengine.config import DictAction
            sub = argparse.ArgumentParser()
            sub.add_argument('--o', nargs='+', action=DictAction)
            options = sub.parse_args(['--o', *args.cfg_options]).o
        flops, params, net_shape = config_complexity(args.config, shape, options, args.count_layer_norm)
        rows.append(dict(model=osp.basename(args.config), shape=net_shape, params=params, flops=flops))

    width = max(len(r['model']) for r in rows)
    print(f'{"model":<{width}}  {"input":>9}  {"params":>8}  {"FLOPs":>7}')
    for r in rows:
        size = f'{r["shape"][0]}x{r["shape"][1]}'
        print(f'{r["model"]:<{width}}  {size:>9}  {human(r["params"]):>8}  {human(r["flops"]):>7}')
    print(f'FLOPs are multiply-adds; LayerNorms {"counted" if args.count_layer_norm else "not counted"}, '
          'elementwise ops not counted (see --help).')
    return rows


if __name__ == '__main__':
    main()
