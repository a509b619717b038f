"""Train and evaluate a Conv2Former UperNet on the embedded ADE-format demo
set, then show what it learned.

    python tools/demo/segmentation_demo.py [--iters 800] [--work-dir work_dirs/demo_segmentation]

Steps: write the deterministic demo set (data/ade_demo, skipped when present),
train Conv2Former-N UperNet from scratch on the CPU with ``tools/train.py``'s
machinery (mmengine logs progress and ETA), evaluate with mmseg's
``IoUMetric``, blend predicted label maps over a few validation images with
mmseg's own ``MMSegInferencer``, and plot loss / mIoU curves. Everything
lands in the work dir; a summary is printed and saved as JSON.
"""
import os

# On a busy 2-core machine OpenMP's default busy-waiting makes every parallel
# op wait for a thread that another process holds: measured 5-10x slower
# training; passive waiting only changes how idle threads wait. It must be
# set before torch starts its thread pool; a value already set is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import glob  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmconv2former.demo.ade import generate_ade_demo  # noqa: E402
from mmconv2former.demo.curves import plot_training_curves  # noqa: E402
from mmconv2former.demo.runner import parse_cfg_options, report, train_and_test  # noqa: E402

CONFIG = osp.join(ROOT, 'configs', 'demo', 'upernet_conv2former-n_demo.py')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo_segmentation')
    parser.add_argument('--data-root', default='data/ade_demo')
    parser.add_argument('--iters', type=int, default=None, help='override train_cfg.max_iters')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=80)
    parser.add_argument('--num-vis', type=int, default=4, help='validation images to draw')
    parser.add_argument('--cfg-options', nargs='+', default=[], help='extra key=value overrides')
    return parser.parse_args(argv)


def class_iou(inferencer, images, label_dir: str) -> dict:
    """Per-class IoU (%) of the inferencer's predictions on ``images``, with
    mmseg's IoUMetric arithmetic; each image's label map (same name, .png, in
    ``label_dir``) read as the dataset reads it (reduce_zero_label: 0 ->
    ignored, k -> k - 1)."""
    import numpy as np
    import torch
    from mmseg.evaluation import IoUMetric
    from PIL import Image
    classes = inferencer.model.dataset_meta['classes']
    totals = None
    predictions = inferencer(images, batch_size=8)['predictions']
    for image, prediction in zip(images, predictions):
        name = osp.splitext(osp.basename(image))[0] + '.png'
        label = torch.from_numpy(np.array(Image.open(osp.join(label_dir, name))).astype(np.int64)) - 1
        label[label < 0] = 255
        pred = torch.from_numpy(prediction.astype(np.int64))
        areas = IoUMetric.intersect_and_union(pred, label, len(classes), 255)
        totals = areas if totals is None else [t + a for t, a in zip(totals, areas)]
    iou = IoUMetric.total_area_to_metrics(*totals, metrics=['mIoU'])['IoU']
    return {name: round(100 * float(value), 2) for name, value in zip(classes, iou)}


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    generate_ade_demo(args.data_root, args.num_train, args.num_val)
    root = args.data_root.rstrip('/') + '/'
    options = {f'{split}_dataloader.dataset.data_root': root for split in ('train', 'val', 'test')}
    if args.iters is not None:
        options['train_cfg.max_iters'] = args.iters
        options['train_cfg.val_interval'] = max(1, min(200, args.iters))
        options['param_scheduler.1.begin'] = int(0.8 * args.iters)  # the config's final decay
        options['param_scheduler.1.end'] = args.iters
        options['default_hooks.checkpoint.interval'] = max(1, min(200, args.iters))
    cfg, runner, metrics, train_seconds, checkpoint = train_and_test(
        args.config, {**options, **parse_cfg_options(args.cfg_options)}, args.work_dir)
    work_dir = runner.work_dir

    # mmseg's own inferencer on our config and checkpoint: label maps blended over the images
    from mmseg.apis import MMSegInferencer
    inferencer = MMSegInferencer(model=args.config, weights=checkpoint, device='cpu')
    images = sorted(glob.glob(osp.join(args.data_root, 'images', 'validation', '*.jpg')))
    vis_dir = osp.join(work_dir, 'predictions')
    inferencer(images[:args.num_vis], out_dir=vis_dir, opacity=0.6)
    per_class_iou = class_iou(inferencer, images, osp.join(args.data_root, 'annotations', 'validation'))

    curves = plot_training_curves(work_dir, osp.join(work_dir, 'curves.png'),
                                  metrics=['mIoU', 'mAcc', 'aAcc'],
                                  title='Conv2Former-N UperNet, demo set')
    summary = dict(
        # IoUMetric returns numpy float32s, which json cannot write
        **{key: round(float(metrics[key]), 2) for key in ('mIoU', 'mAcc', 'aAcc')},
        per_class_iou=per_class_iou, iters=cfg.train_cfg.max_iters, train_seconds=round(train_seconds, 1),
        total_seconds=round(time.time() - start, 1), threads=__import__('torch').get_num_threads(),
        checkpoint=checkpoint, predictions=osp.join(vis_dir, 'vis'), curves=curves)
    return report(work_dir, 'Conv2Former-N UperNet on the demo set', summary)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
