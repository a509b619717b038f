"""Train a detector (mmdet), segmentor (mmseg) or classifier (mmpretrain).

The library is picked from the config's ``default_scope``; the command line is
mmdet's, so ``tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
[--auto-scale-lr] [--cfg-options k=v ...] [--launcher pytorch|slurm]``.
On a machine without CUDA, SyncBN and AMP are replaced by BN and fp32 (the log
says so), so every config also runs on CPU. A new run never overwrites an
earlier one: if the work dir holds checkpoints, it writes to ``<work dir>-runN``.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from mmengine.config import DictAction  # noqa: E402

from mmconv2former.engine.runtime import build_runner, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a Conv2Former model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (GPU only; ignored with a warning on CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (GPUs x samples per GPU) / auto_scale_lr.base_batch_size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint in the work dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value (e.g. train_cfg.max_iters=100)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir,
                      resume=args.resume, mode='train')
    if args.amp:
        import torch
        if torch.cuda.is_available():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            print('--amp ignored: mmengine AMP needs a GPU; training in fp32', file=sys.stderr)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise SystemExit('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True
    runner = build_runner(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
