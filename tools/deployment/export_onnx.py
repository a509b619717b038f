"""Export a trained classifier, segmentor or detector to ONNX, and check it.

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT -o model.onnx
        [--shape H W] [--dynamic] [--opset N] [--features] [--switch-to-deploy]
        [--exporter torchscript|dynamo]
        [--verify [--image PATH ...] [--tolerance 1e-4] [--repeat 5]] [--force]

The graph takes raw pixels, float32 (N, 3, H, W), in the channel order the
config's test pipeline loads them (BGR); normalisation and padding happen
inside it. What comes out, per kind of model (docs/deployment.md has more):

  classifier (mmpretrain)   logits
  segmentor (mmseg)         seg_logits (N, C, H, W) and seg_labels (N, H, W), whole-image
  single-stage detector     the dense head's raw per-level outputs (no decoding, no NMS)
  --features (any, and the only choice for two-stage detectors)   backbone + neck maps

--verify runs the file in onnxruntime and the PyTorch model (through its own
data preprocessor and inference route) on real images (--image files or
folders; else a few of the config's test images if they are on disk; else a
generated scene) and on random input (with --dynamic also at other sizes,
multiples of 32 and not), prints the max relative difference
(max |onnx - torch| / max |torch| per output) and the time of both, and
fails (exit 1) above --tolerance.
"""
import os

# Passive OpenMP waiting: busy-waiting threads make 2-core runs much slower
# whenever another process shares the cores (see tests/conftest.py).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # a checkout

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint of the whole model (tools/train.py saves one)')
    parser.add_argument('-o', '--output', help='ONNX file to write (default: the checkpoint '
                        'path with .onnx)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: mmseg crop_size, 224x224 for classifiers, '
                        '800x1344 for detectors); the fixed size unless --dynamic')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch, height and width (any size >= 32)')
    parser.add_argument('--opset', type=int, help='ONNX opset (default 17; 18 with --exporter dynamo)')
    parser.add_argument('--features', action='store_true',
                        help='export backbone + neck feature maps only')
    parser.add_argument('--switch-to-deploy', action='store_true',
                        help="export the backbone in its folded inference form "
                        "(Conv2Former.switch_to_deploy(): layer scales and the stem's BatchNorm "
                        'folded into weights); --verify still compares with the original model')
    parser.add_argument('--exporter', choices=['torchscript', 'dynamo'], default='torchscript',
                        help="torch.onnx's TorchScript exporter (default: fast, any dynamic size) "
                        'or the torch.export-based one (needs onnxscript)')
    parser.add_argument('--verify', action='store_true',
                        help='compare onnxruntime with PyTorch and time both')
    parser.add_argument('--image', nargs='+', default=[],
                        help='real images (files or folders) for --verify')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest max relative difference --verify accepts (fp32)')
    parser.add_argument('--min-agreement', type=float, default=99.9,
                        help='smallest %% of equal labels (segmentors) / top-1 (classifiers) '
                        '--verify accepts per image')
    parser.add_argument('--repeat', type=int, default=5, help='timed runs (median is reported)')
    parser.add_argument('--force', action='store_true', help='overwrite an existing output file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmconv2former import export

    output = args.output or osp.splitext(args.checkpoint)[0] + '.onnx'
    _refuse_early(args, output)  # before the (slow) model build and export
    try:
        model, cfg, library = export.load_model(args.config, args.checkpoint, args.cfg_options)
        spec = export.build_spec(model, library, features=args.features,
                                 switch_to_deploy=args.switch_to_deploy)
    except (export.ExportError, FileNotFoundError) as exc:
        raise SystemExit(f'error: {exc}')
    shape = tuple(args.shape) if args.shape else export.default_shape(cfg, library)
    start = time.perf_counter()
    try:
        export.export_onnx(spec, output, shape, dynamic=args.dynamic, opset=args.opset,
                           exporter=args.exporter, force=args.force,
                           metadata=export.metadata_for(model, args.config, args.checkpoint))
    except (ValueError, FileExistsError) as exc:  # ExportError is a ValueError
        if exc.__cause__ is not None:  # the exporter's own traceback, for a bug report
            traceback.print_exception(exc.__cause__)
        raise SystemExit(f'error: {exc}')
    size_mb = osp.getsize(output) / 2 ** 20
    print(f'wrote {output} ({size_mb:.1f} MB, {args.exporter} exporter, '
          f'{time.perf_counter() - start:.1f} s): {spec.description}')
    print(f'input  images: float32 (N, 3, {"H" if args.dynamic else shape[0]}, '
          f'{"W" if args.dynamic else shape[1]}) raw BGR pixels'
          + (' (batch, height and width dynamic)' if args.dynamic else ''))
    print(f'output {", ".join(spec.output_names)}')
    return _verify(args, output, spec, cfg, library, shape) if args.verify else 0


def _refuse_early(args, output: str) -> None:
    if osp.exists(output) and not args.force:
        raise SystemExit(f'error: {output!r} exists; pass --force to overwrite it, or choose '
                         'another output with -o')
    missing = [m for m in (['onnx'] + (['onnxruntime'] if args.verify else [])
                           + (['onnxscript'] if args.exporter == 'dynamo' else []))
               if _missing(m)]
    if missing:
        raise SystemExit(f'error: {", ".join(missing)} not installed; install the export extras: '
                         "pip install -r requirements/deploy.txt (or pip install -e '.[deploy]')")


def _verify(args, output: str, spec, cfg, library: str, shape) -> int:
    """--verify: compare, print the numbers; 1 when a limit is exceeded."""
    from mmconv2former import export

    with tempfile.TemporaryDirectory(prefix='mmconv2former_export_') as tmp:
        paths = export.find_images(args.image) if args.image else export.config_images(cfg)
        names = [_short(p) for p in paths]
        if not paths:
            paths, names = [generated_image(shape, tmp)], ['generated scene']
            print(f'no --image given and no test images of the config on disk: using a '
                  f'generated {shape[0]}x{shape[1]} scene')
        named = list(zip(names, export.load_images(cfg, library, paths)))
        report = export.verify(output, spec, named, shape, args.dynamic, args.tolerance,
                               args.min_agreement, args.repeat)
    for line in _summarise(report, len(paths)):
        print(line)
    for failure in report.failures:
        print(f'FAIL {failure}', file=sys.stderr)
    return 1 if report.failures else 0


def _summarise(report, n_real: int):
    """All comparisons for a few images; for many, the worst one and the labels pooled."""
    lines = report.lines()
    if n_real <= 8:
        return lines
    real, rest = report.comparisons[:n_real], lines[n_real:]
    worst = max(real, key=lambda c: c.max_rel_diff)
    head = [f'{n_real} real images: worst max rel diff {worst.max_rel_diff:.2e} ({worst.name})']
    scored = [c for c in real if c.label_agreement is not None]
    if scored:  # pooled over all labels (pixels, or images for classifiers)
        labels = sum(c.labels for c in scored)
        mismatches = sum(c.label_mismatches for c in scored)
        head[0] += (f'; labels equal: {min(c.label_agreement for c in scored):.3f}% (worst image), '
                    f'{100.0 * (labels - mismatches) / labels:.4f}% of all '
                    f'({mismatches} of {labels} differ)')
    return head + rest


def generated_image(size, directory: str) -> str:
    """Write a textured test scene (the segmentation demo's generator) as PNG
    and return its path: something to verify on when no real image is at hand."""
    import numpy as np
    from PIL import Image

    from mmconv2former.demo.materials import make_material_scene
    scene = make_material_scene(np.random.default_rng(0), size=tuple(size))
    path = osp.join(directory, 'generated_scene.png')
    Image.fromarray(scene.image).save(path)
    return path


def _short(path: str) -> str:
    parts = path.replace('\\', '/').split('/')
    return '/'.join(parts[-3:])


def _missing(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is None


if __name__ == '__main__':
    sys.exit(main())
