"""Evaluate a detector, segmentor or classifier checkpoint.

``tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--show-dir DIR]
[--out FILE.pkl] [--cfg-options k=v ...] [--launcher pytorch|slurm]``.
The library is picked from the config's ``default_scope``. ``--tta`` runs the
config's test-time augmentation (mmseg: multi-scale + flip from its
``tta_pipeline``; mmdet: the config's, or horizontal flip by default).
"""
import argparse
import os
import os.path as osp
import sys
from copy import deepcopy

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from mmengine.config import ConfigDict, DictAction  # noqa: E402

from mmconv2former.engine.runtime import build_runner, innermost_dataset, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a Conv2Former model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the metrics file is written')
    parser.add_argument('--out', help='dump predictions to a .pkl file for offline evaluation')
    parser.add_argument('--show-dir', help='save images with predictions drawn into this directory')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument('--switch-to-deploy', '--deploy', dest='switch_to_deploy', action='store_true',
                        help="evaluate with Conv2Former's folded inference form (switch_to_deploy(): "
                             'layer scales and the stem BatchNorm folded into the weights)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def apply_tta(cfg, library: str) -> None:
    """Wrap the model in the library's TTA model and swap the test pipeline."""
    if library == 'mmdet' and 'tta_model' not in cfg:
        cfg.tta_model = dict(type='DetTTAModel',
                             tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if library == 'mmdet' and 'tta_pipeline' not in cfg:
        pipeline = deepcopy(innermost_dataset(cfg.test_dataloader.dataset).pipeline)
        pipeline[-1] = dict(type='TestTimeAug', transforms=[
            [dict(type='RandomFlip', prob=1.0), dict(type='RandomFlip', prob=0.0)],
            [dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                                   'scale_factor', 'flip', 'flip_direction'))]])
        cfg.tta_pipeline = pipeline
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise SystemExit(f'--tta needs `tta_model` and `tta_pipeline` in the config ({library}); '
                         'the segmentation configs inherit them from mmseg\'s dataset bases')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    innermost_dataset(cfg.test_dataloader.dataset).pipeline = cfg.tta_pipeline


def enable_drawing(cfg, library: str, show_dir: str) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise SystemExit('--show-dir needs default_hooks.visualization in the config')
    hook['draw'] = True
    if library == 'mmdet':
        hook['test_out_dir'] = show_dir
    elif library == 'mmseg':
        cfg.visualizer['save_dir'] = show_dir
    else:  # mmpretrain's VisualizationHook
        hook['enable'] = True
        hook['out_dir'] = show_dir


def main(argv=None) -> None:
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint!r}; pass a file written by '
                                'tools/train.py (work_dirs/<config>/*.pth) or a converted release file')
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir, mode='test')
    library = cfg.default_scope
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_drawing(cfg, library, args.show_dir)
    if args.tta:
        apply_tta(cfg, library)
    if args.switch_to_deploy:
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='SwitchToDeployHook')]
    runner = build_runner(cfg)
    from mmconv2former.checkpoint import check_model_checkpoint
    check_model_checkpoint(runner.model, args.checkpoint)
    if args.out:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise SystemExit('--out must end with .pkl or .pickle')
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    return runner.test()


if __name__ == '__main__':
    main()
