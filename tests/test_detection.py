"""Detection: configs, models, layer decay, and the tools end to end."""
import glob
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import DefaultScope

from conftest import ROOT, TINY
from mmconv2former import Conv2Former

DET_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'mask_rcnn', '*.py'))
                     + glob.glob(osp.join(ROOT, 'configs', 'cascade_rcnn', '*.py'))
                     + glob.glob(osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_*.py')))
DEMO_CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_conv2former-n_fpn_demo.py')


def build_detector(cfg):
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg.model)


def test_all_detection_configs_are_found():
    names = {osp.basename(p) for p in DET_CONFIGS}
    for size in 'tsb':
        assert f'mask-rcnn_conv2former-{size}_fpn_1x_coco.py' in names
        assert f'mask-rcnn_conv2former-{size}_fpn_amp-ms-crop-3x_coco.py' in names
        assert f'cascade-mask-rcnn_conv2former-{size}_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py' in names


@pytest.mark.parametrize('path', DET_CONFIGS, ids=osp.basename)
def test_config_builds_its_model(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmdet'
    backbone = cfg.model.backbone
    assert backbone.type == 'Conv2Former'
    arch = Conv2Former.arch_settings[backbone.arch]
    assert list(cfg.model.neck.in_channels) == arch['channels']  # neck fits the variant
    model = build_detector(cfg)
    assert isinstance(model.backbone, Conv2Former)
    assert model.backbone.out_channels == tuple(arch['channels'])
    if 'demo' not in path:
        init = backbone.init_cfg
        assert init.type == 'Pretrained' and init.prefix == 'backbone.'
        assert cfg.optim_wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
        assert 'num_layers' not in cfg.optim_wrapper.paramwise_cfg
    if 'cascade' in path:
        assert [h.loss_bbox.type for h in cfg.model.roi_head.bbox_head] == ['GIoULoss'] * 3
        assert all(h.num_shared_convs == 4 and h.num_shared_fcs == 1 for h in cfg.model.roi_head.bbox_head)
        assert cfg.model.backbone.drop_path_rate == {'t': 0.2, 's': 0.6, 'b': 0.9}[backbone.arch]
    if '3x' in path:
        assert cfg.train_cfg.max_epochs == 36
        assert cfg.param_scheduler[1].milestones == [27, 33]
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.optimizer.type == 'AdamW' and cfg.optim_wrapper.optimizer.weight_decay == 0.05


def test_cpu_adaptation_of_gpu_recipe():
    from mmconv2former.engine.runtime import load_config
    path = [p for p in DET_CONFIGS if 'cascade' in p and '-t_' in p][0]
    cfg = load_config(path)
    if torch.cuda.is_available():
        pytest.skip('adaptation only happens without CUDA')
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert all(h.norm_cfg.type == 'BN' for h in cfg.model.roi_head.bbox_head)
    assert 'SyncBN' not in cfg.pretty_text


def _tiny_inputs(num_classes):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(2, [(3, 96, 128), (3, 128, 96)], num_items=[2, 3], num_classes=num_classes,
                          with_mask=True)


@pytest.mark.parametrize('kind', ['mask_rcnn', 'cascade_rcnn'])
def test_detector_forward_backward_on_cpu(kind):
    path = [p for p in DET_CONFIGS if f'/{kind}/' in p and '-t_' in p][0]
    cfg = Config.fromfile(path)
    cfg.model.backbone.arch = dict(TINY)
    cfg.model.backbone.init_cfg = None
    cfg.model.neck.in_channels = list(TINY['channels'])
    from mmconv2former.engine.runtime import adapt_to_device
    adapt_to_device(cfg)
    model = build_detector(cfg)
    model.init_weights()
    model.train()
    data = model.data_preprocessor(_tiny_inputs(80), True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss)
    assert any(k.endswith('loss_mask') for k in log_vars)
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.stages[-1][-1].mlp.fc2.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(_tiny_inputs(80), False), mode='predict')
    assert len(results) == 2 and hasattr(results[0].pred_instances, 'masks')


# ----------------------------------------------------------------------------- layer decay
def _build_optim(decay_type, rate=0.7, arch='s'):
    from mmengine.optim import build_optim_wrapper
    model = nn.Module()
    model.backbone = Conv2Former(dict(Conv2Former.arch_settings[arch], channels=[8, 16, 24, 32]))
    model.neck = nn.Conv2d(4, 4, 1)
    cfg = dict(type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
               paramwise_cfg=dict(decay_rate=rate, decay_type=decay_type),
               optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
    with DefaultScope.overwrite_default_scope('mmdet'):  # as an mmdet runner builds it
        return model, build_optim_wrapper(model, cfg)


@pytest.mark.parametrize('decay_type', ['layer_wise', 'stage_wise'])
def test_layer_decay_groups(decay_type):
    rate = 0.7
    model, wrapper = _build_optim(decay_type, rate)
    backbone = model.backbone
    # S has 32 blocks in stage 3: 4 + 31 // 3 = 14 layer groups, plus stem and neck ids
    num_layers = 16 if decay_type == 'layer_wise' else 7
    seen = {}
    for group in wrapper.optimizer.param_groups:
        for name, param in zip(group['param_names'], group['params']):
            seen[name] = group
    named = dict(model.named_parameters())
    assert set(seen) == set(named)  # every parameter sits in exactly one group
    for name, group in seen.items():
        layer_id, n = backbone.get_layer_depth(name, 'backbone.', stage_wise=decay_type == 'stage_wise')
        assert n == num_layers
        scale = rate ** (num_layers - 1 - layer_id)
        assert group['lr'] == pytest.approx(1e-3 * scale)
        one_d = named[name].ndim == 1
        assert group['weight_decay'] == (0.0 if one_d else 0.05), name
    # spot checks that pin the schedule
    stem = seen['backbone.downsample_layers.0.0.weight']
    assert stem['lr'] == pytest.approx(1e-3 * rate ** (num_layers - 1))
    assert seen['neck.weight']['lr'] == pytest.approx(1e-3)
    assert seen['backbone.stages.2.3.layer_scale_1']['weight_decay'] == 0.0
    assert seen['backbone.stages.2.3.attn.norm.weight']['weight_decay'] == 0.0
    assert seen['backbone.stages.2.3.attn.v.bias']['weight_decay'] == 0.0
    if decay_type == 'layer_wise':
        early, late = seen['backbone.stages.2.0.mlp.fc1.weight'], seen['backbone.stages.2.31.mlp.fc1.weight']
        assert late['lr'] / early['lr'] == pytest.approx(rate ** -10)  # blocks 0 and 31: groups 3 and 13
    else:
        assert seen['backbone.stages.2.0.mlp.fc1.weight']['lr'] == seen['backbone.stages.2.31.mlp.fc1.weight']['lr']


def test_layer_decay_refuses_backbone_without_depth_rule():
    from mmengine.optim import build_optim_wrapper
    model = nn.Module()
    model.backbone = nn.Conv2d(3, 4, 1)
    with pytest.raises(TypeError, match='get_layer_depth'):
        build_optim_wrapper(model, dict(type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
                                        paramwise_cfg=dict(decay_rate=0.9),
                                        optimizer=dict(type='AdamW', lr=1e-3)))
    with pytest.raises(ValueError, match='decay_type'):
        _build_optim('block_wise')


# ----------------------------------------------------------------------------- tools end to end
def _demo_options(root, work_dir):
    root = root.rstrip('/') + '/'
    return ['--work-dir', work_dir, '--cfg-options',
            f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}annotations/instances_val.json',
            f'test_evaluator.ann_file={root}annotations/instances_val.json',
            'train_cfg.max_epochs=1', 'train_cfg.val_interval=1', 'default_hooks.checkpoint.interval=1']


def test_train_then_test_tools_end_to_end(coco_demo, tmp_path):
    import tools.test as test_tool
    import tools.train as train_tool
    work_dir = str(tmp_path / 'work')
    train_tool.main([DEMO_CONFIG, *_demo_options(coco_demo, work_dir)])
    checkpoint = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(checkpoint)
    assert open(osp.join(work_dir, 'last_checkpoint')).read().strip().endswith('epoch_1.pth')
    metrics = test_tool.main([DEMO_CONFIG, checkpoint, *_demo_options(coco_demo, str(tmp_path / 'eval'))])
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0

    # mmdet's own inferencer works with our config and checkpoint
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(model=DEMO_CONFIG, weights=checkpoint, device='cpu', show_progress=False)
    image = sorted(glob.glob(osp.join(coco_demo, 'val', '*.png')))[0]
    out = inferencer(image, out_dir=str(tmp_path / 'vis'), no_save_pred=True)
    assert len(out['predictions']) == 1
    assert glob.glob(str(tmp_path / 'vis' / 'vis' / '*.png'))


@pytest.mark.slow
def test_demo_really_learns(tmp_path):
    """A shortened demo (2 epochs) must reach an mAP far above chance (~0)."""
    from tools.demo.detection_demo import main
    summary = main(['--epochs', '2', '--work-dir', str(tmp_path / 'work'),
                    '--data-root', str(tmp_path / 'coco_demo'), '--num-vis', '2'])
    assert summary['bbox_mAP'] >= 0.05, summary
    assert summary['segm_mAP'] >= 0.05, summary
    assert osp.isfile(summary['curves']) and osp.getsize(summary['curves']) > 10_000
    assert len(glob.glob(osp.join(summary['predictions'], '*.png'))) == 2
