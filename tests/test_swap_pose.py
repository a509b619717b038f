"""tools/misc/swap_backbone.py on mmpose configs: top-down heatmap models
(ResNet, HRNet, Swin sources), RTMPose, a regression model and a neck swap,
train one step and predict; what cannot be mapped is refused; configs/pose/
is the tool's output plus pretrained weights; a generated COCO-format
keypoint sample goes through mmpose's own dataset and ``CocoMetric``."""
import json
import math
import os.path as osp

import numpy as np
import pytest
from mmengine.config import Config

from conftest import TINY, assert_shipped_config_is_swap_output
from mmconv2former.swap import MEAN, STD, SwapError, check_config, resolve_config, swap_backbone

pytest.importorskip('mmpose')
pytest.importorskip('xtcocotools._mask', reason='xtcocotools does not import (built for another numpy?)')

C = TINY['channels']
TD = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/'

# (source, Conv2Former stages, expected head/neck arguments)
FAMILIES = {
    'resnet_heatmap': (TD + 'td-hm_res50_8xb64-210e_coco-256x192.py', (3, ), {'head.in_channels': C[3]}),
    # HRNet's single stride-4 output: all four stages, concatenated at stride 4
    'hrnet_heatmap': (TD + 'td-hm_hrnet-w32_8xb64-210e_coco-256x192.py', (0, 1, 2, 3),
                      {'head.in_channels': sum(C), 'neck.type': 'FeatureMapProcessor', 'neck.concat': True}),
    'swin_heatmap': (TD + 'td-hm_swin-t-p4-w7_8xb32-210e_coco-256x192.py', (3, ), {'head.in_channels': C[3]}),
    'rtmpose': ('mmpose::body_2d_keypoint/rtmpose/coco/rtmpose-t_8xb256-420e_coco-256x192.py', (3, ),
                {'head.in_channels': C[3], 'head.in_featuremap_size': (6, 8)}),
    # a regression head behind a pooling neck
    'rle_regression': ('mmpose::body_2d_keypoint/topdown_regression/coco/td-reg_res50_rle-8xb64-210e_coco-256x192.py',
                       (3, ), {'head.in_channels': C[3], 'neck.type': 'GlobalAveragePooling'}),
    # HRNetV2: the source's own FeatureMapProcessor neck concatenates all four outputs
    'hrnetv2_neck': ('mmpose::hand_2d_keypoint/topdown_heatmap/onehand10k/'
                     'td-hm_hrnetv2-w18_8xb64-210e_onehand10k-256x256.py',
                     (0, 1, 2, 3), {'head.in_channels': sum(C), 'neck.concat': True}),
}


def _lookup(cfg, dotted):
    for key in dotted.split('.'):
        cfg = cfg[key]
    return tuple(cfg) if isinstance(cfg, (list, tuple)) else cfg


@pytest.mark.parametrize('family', list(FAMILIES))
def test_swapped_pose_config_trains_and_predicts(family, tmp_path):
    src, stages, expected = FAMILIES[family]
    dst = tmp_path / f'{family}.py'
    result = swap_backbone(src, TINY, str(dst))
    assert result.library == 'mmpose' and result.out_indices == stages
    text = dst.read_text()
    assert f"_base_ = '{src}'" in text and "'mmconv2former'" in text
    cfg = Config.fromfile(str(dst))
    assert cfg.model.backbone.type == 'Conv2Former' and tuple(cfg.model.backbone.out_indices) == stages
    for key, value in expected.items():
        assert _lookup(cfg.model, key) == value, key
    source = Config.fromfile(resolve_config(src)).model
    # only the channel argument changed: the head's codec, losses, deconvolutions stay
    assert {k: v for k, v in cfg.model.head.items() if k != 'in_channels'} == \
        {k: v for k, v in source.head.items() if k != 'in_channels'}
    pre = cfg.model.data_preprocessor
    assert list(pre.mean) == MEAN and list(pre.std) == STD and pre.bgr_to_rgb is True

    out = check_config(str(dst))
    assert math.isfinite(out['loss']) and out['predictions'] == 2
    w, h = cfg.codec['input_size']
    assert out['shape'] == (h, w)  # the codec's crop, not the --check-size square


def test_local_config_path_in_mmpose(tmp_path):
    """A config file of an mmpose checkout (here: the installed copy) works as
    well as its ``mmpose::`` name; the delta inherits it by relative path."""
    local = resolve_config(FAMILIES['resnet_heatmap'][0])
    dst = tmp_path / 'local.py'
    swap_backbone(local, TINY, str(dst))
    assert f"_base_ = '{osp.relpath(local, tmp_path)}'" in dst.read_text()
    cfg = Config.fromfile(str(dst))
    assert cfg.default_scope == 'mmpose' and cfg.model.head.in_channels == C[3]


def test_rtmpose_featuremap_size_follows_the_stride(tmp_path):
    src = FAMILIES['rtmpose'][0]
    result = swap_backbone(src, TINY, str(tmp_path / 'rtm.py'))
    assert any('in_featuremap_size (6, 8)' in n and 'stride 32' in n for n in result.notes)
    # a head whose size does not match its input size / stride is rewritten
    from mmconv2former.swap import _featuremap_size
    delta = {}
    changes, notes = _featuremap_size(dict(input_size=(288, 384), in_featuremap_size=(6, 8)), 'head', 32, delta)
    assert delta == {'in_featuremap_size': (9, 12)} and '(6, 8) -> (9, 12)' in changes[0] and not notes


def test_hrnet_note_says_why_stages_are_concatenated(tmp_path):
    result = swap_backbone(FAMILIES['hrnet_heatmap'][0], 't', str(tmp_path / 'hr.py'))
    assert result.old_strides == [4] and result.new_channels == [72, 144, 288, 576]
    assert any('FeatureMapProcessor(concat=True) added' in c for c in result.changes)
    assert Config.fromfile(str(tmp_path / 'hr.py')).model.head.in_channels == 72 + 144 + 288 + 576


def test_refuses_a_stride16_vit_and_writes_nothing(tmp_path):
    dst = tmp_path / 'vit.py'
    with pytest.raises(SwapError, match='nothing was written') as info:
        swap_backbone(TD + 'td-hm_ViTPose-small-simple_8xb64-210e_coco-256x192.py', 't', str(dst))
    assert any('strides [16]' in p and 'nothing reading them' in p for p in info.value.problems)
    assert not list(tmp_path.iterdir())


def test_refuses_a_dilated_pose_backbone():
    from mmconv2former.swap import map_stages
    problems = map_stages([4, 8, 8, 8], 'mmpose')[2]
    assert 'dilated' in problems[0] and 'heatmap' in problems[0]


def test_shipped_config_is_the_tools_output_with_weights(tmp_path):
    shipped = assert_shipped_config_is_swap_output(
        'configs/pose/td-hm_conv2former-t_8xb64-210e_coco-256x192.py',
        TD + 'td-hm_res50_8xb64-210e_coco-256x192.py', 'head', tmp_path)
    from mmconv2former.engine.runtime import library_models
    model = library_models('mmpose').build(shipped.model)  # builds without the weights file
    assert model.head.final_layer.out_channels == 17


def _keypoint_sample(root, count=3, size=(160, 120)):
    """A COCO person-keypoint set of ``count`` random images, one person each."""
    import cv2
    from mmpose.datasets.datasets.utils import parse_pose_metainfo
    meta = parse_pose_metainfo(dict(from_file='configs/_base_/datasets/coco.py'))
    names = [meta['keypoint_id2name'][i] for i in range(meta['num_keypoints'])]
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (root / 'images').mkdir(parents=True)
    for i in range(count):
        h, w = size
        cv2.imwrite(str(root / 'images' / f'{i:06d}.jpg'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        x0, y0, bw, bh = 20.0, 10.0, 60.0, 100.0
        points = np.stack([rng.uniform(x0, x0 + bw, 17), rng.uniform(y0, y0 + bh, 17), np.full(17, 2.0)], 1)
        images.append(dict(id=i + 1, file_name=f'{i:06d}.jpg', height=h, width=w))
        annotations.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, area=bw * bh,
                                bbox=[x0, y0, bw, bh], num_keypoints=17,
                                keypoints=[round(float(v), 2) for v in points.reshape(-1)]))
    categories = [dict(id=1, name='person', supercategory='person', keypoints=names,
                       skeleton=[[a + 1, b + 1] for a, b in meta['skeleton_links']])]
    ann = root / 'keypoints.json'
    ann.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return str(ann)


def test_generated_coco_keypoints_through_mmpose_dataset_and_coco_metric(tmp_path):
    """One epoch of the swapped model on a generated COCO keypoint set, with
    mmpose's own CocoDataset, pipelines and CocoMetric doing the validation."""
    from mmconv2former.engine.runtime import build_runner
    ann = _keypoint_sample(tmp_path / 'data')
    dst = tmp_path / 'pose.py'
    swap_backbone(FAMILIES['resnet_heatmap'][0], TINY, str(dst))
    cfg = Config.fromfile(str(dst))
    data = dict(data_root=str(tmp_path / 'data'), ann_file=ann, data_prefix=dict(img='images/'))
    for loader in ('train_dataloader', 'val_dataloader'):
        cfg[loader].update(batch_size=2, num_workers=0, persistent_workers=False)
        cfg[loader].dataset.update(data, bbox_file=None)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = cfg.test_evaluator = dict(type='CocoMetric', ann_file=ann)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, save_best=None)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    cfg.work_dir = str(tmp_path / 'work')
    cfg.launcher = 'none'
    runner = build_runner(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    assert 'coco/AP' in metrics and 0 <= metrics['coco/AP'] <= 1


def test_command_line_check_on_a_pose_config(tmp_path, capsys):
    from tools.misc.swap_backbone import main
    dst = tmp_path / 'td.py'
    assert main([FAMILIES['resnet_heatmap'][0], '--arch', 'n', '-o', str(dst), '--check']) == 0
    out = capsys.readouterr().out
    assert 'check: one training step' in out and '256x192 images' in out and 'params:' in out
