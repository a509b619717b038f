"""Train and evaluate a Conv2Former-N image classifier on the embedded demo
set on a CPU, then classify a few validation images with mmpretrain's own
``ImageClassificationInferencer``.

    python tools/demo/classification_demo.py [--epochs 30] [--work-dir work_dirs/demo_classification]

Steps: write the deterministic image-folder set (data/shapes_cls, skipped
when present), train from scratch with ``tools/train.py``'s machinery
(mmengine logs progress and ETA), evaluate top-1 accuracy (chance is 33.3 %),
classify a few validation images with the inferencer, and
plot loss / accuracy curves. Everything lands in the work dir; a summary is
printed and saved as JSON.
"""
import argparse
import glob
import os
import os.path as osp
import sys
import time

# OpenMP threads that spin while they wait slow training down several-fold on
# a CPU shared with other jobs; passive waiting costs nothing on an idle one.
# It must be set before torch (and with it the OpenMP runtime) is loaded.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmconv2former.demo.curves import plot_training_curves  # noqa: E402
from mmconv2former.demo.imagefolder import CLASSES, generate_imagefolder_demo  # noqa: E402
from mmconv2former.demo.runner import parse_cfg_options, report, train_and_test  # noqa: E402

CONFIG = osp.join(ROOT, 'configs', 'demo', 'conv2former-n_1xb32_shapes-demo.py')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo_classification')
    parser.add_argument('--data-root', default='data/shapes_cls')
    parser.add_argument('--epochs', type=int, default=None, help='override max_epochs')
    parser.add_argument('--num-train', type=int, default=600)
    parser.add_argument('--num-val', type=int, default=150)
    parser.add_argument('--num-predict', type=int, default=6, help='validation images to classify')
    parser.add_argument('--cfg-options', nargs='+', default=[], help='extra key=value overrides')
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    generate_imagefolder_demo(args.data_root, args.num_train, args.num_val)
    root = args.data_root.rstrip('/') + '/'
    options = {f'{split}_dataloader.dataset.data_root': root for split in ('train', 'val', 'test')}
    if args.epochs is not None:
        interval = max(1, min(5, args.epochs))
        options.update({'train_cfg.max_epochs': args.epochs, 'train_cfg.val_interval': interval,
                        'param_scheduler.1.end': args.epochs,
                        'default_hooks.checkpoint.interval': interval})
    cfg, runner, metrics, train_seconds, checkpoint = train_and_test(
        args.config, {**options, **parse_cfg_options(args.cfg_options)}, args.work_dir)
    work_dir = runner.work_dir

    # mmpretrain's own inferencer on our config and checkpoint
    from mmpretrain.apis import ImageClassificationInferencer
    inferencer = ImageClassificationInferencer(model=cfg, pretrained=checkpoint, device='cpu')
    images = sorted(glob.glob(osp.join(args.data_root, 'val', '*', '*.png')))
    images = images[::max(1, len(images) // max(1, args.num_predict))][:args.num_predict]
    predictions = []
    for image, result in zip(images, inferencer(images, batch_size=len(images) or 1)):
        predictions.append(dict(image=osp.relpath(image, args.data_root),
                                truth=osp.basename(osp.dirname(image)),
                                predicted=result['pred_class'], score=round(float(result['pred_score']), 3)))

    curves = plot_training_curves(work_dir, osp.join(work_dir, 'curves.png'), metrics=['accuracy/top1'],
                                  title='Conv2Former-N classifier, demo set')
    summary = dict(
        top1=metrics.get('accuracy/top1'), chance=round(100 / len(CLASSES), 1),
        epochs=cfg.train_cfg.max_epochs, train_images=len(runner.train_dataloader.dataset),
        val_images=len(runner.test_dataloader.dataset), train_seconds=round(train_seconds, 1),
        total_seconds=round(time.time() - start, 1), threads=__import__('torch').get_num_threads(),
        checkpoint=checkpoint, curves=curves, predictions=predictions)
    report(work_dir, 'Conv2Former-N classifier on the demo set', summary, hide=('predictions', ))
    for p in predictions:
        print(f"{p['image']:>28}: {p['predicted']:<8} ({p['score']:.3f}), truth {p['truth']}")
    return summary


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
