"""The main job on a machine without COCO: train and evaluate a Conv2Former
Mask R-CNN on the embedded demo set, then show what it learned.

    python tools/demo/detection_demo.py [--epochs 12] [--work-dir work_dirs/demo_detection]

Steps: write the deterministic demo set (data/coco_demo, skipped when
present), train Conv2Former-N Mask R-CNN from scratch on the CPU with
``tools/train.py``'s machinery (mmengine logs progress and ETA), evaluate with
mmdet's ``CocoMetric`` (bbox and segm), draw predictions on a few validation
images with mmdet's own ``DetInferencer``, and plot loss / mAP curves.
Everything lands in the work dir; a summary is printed and saved as JSON.
"""
import argparse
import glob
import os
import os.path as osp
import sys
import time

# Spinning OpenMP threads slow training several-fold on a CPU shared with other
# jobs; passive waiting costs nothing on an idle one. Set before torch loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmconv2former.demo.coco import generate_coco_demo  # noqa: E402
from mmconv2former.demo.curves import plot_training_curves  # noqa: E402
from mmconv2former.demo.runner import parse_cfg_options, report, train_and_test  # noqa: E402

CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_conv2former-n_fpn_demo.py')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo_detection')
    parser.add_argument('--data-root', default='data/coco_demo')
    parser.add_argument('--epochs', type=int, default=None, help='override max_epochs')
    parser.add_argument('--num-train', type=int, default=240)
    parser.add_argument('--num-val', type=int, default=60)
    parser.add_argument('--num-vis', type=int, default=4, help='validation images to draw')
    parser.add_argument('--cfg-options', nargs='+', default=[], help='extra key=value overrides')
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    generate_coco_demo(args.data_root, args.num_train, args.num_val)
    root = args.data_root.rstrip('/') + '/'
    options = {
        'train_dataloader.dataset.data_root': root,
        'val_dataloader.dataset.data_root': root,
        'test_dataloader.dataset.data_root': root,
        'val_evaluator.ann_file': root + 'annotations/instances_val.json',
        'test_evaluator.ann_file': root + 'annotations/instances_val.json',
    }
    if args.epochs is not None:
        options['train_cfg.max_epochs'] = args.epochs
        options['train_cfg.val_interval'] = max(1, min(2, args.epochs))
        options['param_scheduler.1.end'] = args.epochs
        options['default_hooks.checkpoint.interval'] = max(1, min(2, args.epochs))
    cfg, runner, metrics, train_seconds, checkpoint = train_and_test(
        args.config, {**options, **parse_cfg_options(args.cfg_options)}, args.work_dir)
    work_dir = runner.work_dir

    # mmdet's own inferencer on our config and checkpoint
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(model=args.config, weights=checkpoint, device='cpu', show_progress=False)
    images = sorted(glob.glob(osp.join(args.data_root, 'val', '*.png')))[:args.num_vis]
    vis_dir = osp.join(work_dir, 'predictions')
    inferencer(images, out_dir=vis_dir, pred_score_thr=0.3, no_save_pred=True)

    curves = plot_training_curves(work_dir, osp.join(work_dir, 'curves.png'),
                                  metrics=['coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50'],
                                  title='Conv2Former-N Mask R-CNN, demo set')
    summary = dict(
        bbox_mAP=metrics.get('coco/bbox_mAP'), segm_mAP=metrics.get('coco/segm_mAP'),
        bbox_mAP_50=metrics.get('coco/bbox_mAP_50'), segm_mAP_50=metrics.get('coco/segm_mAP_50'),
        epochs=cfg.train_cfg.max_epochs, train_seconds=round(train_seconds, 1),
        total_seconds=round(time.time() - start, 1), threads=__import__('torch').get_num_threads(),
        checkpoint=checkpoint, predictions=osp.join(vis_dir, 'vis'), curves=curves)
    return report(work_dir, 'Conv2Former-N Mask R-CNN on the demo set', summary)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
