"""tools/misc/swap_backbone.py: installed mmdet / mmseg / mmpretrain configs,
swapped to Conv2Former, train one step and predict; what cannot be mapped is
refused and nothing is written; an existing output is never overwritten."""
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from conftest import ROOT, TINY  # noqa: F401  (ROOT: puts the checkout on sys.path)
from mmconv2former.swap import MEAN, STD, SwapError, check_config, resolve_config, swap_backbone

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')

# The tiny arch keeps every check to seconds on a CPU; the mapping logic does
# not depend on the widths.
C = TINY['channels']

# (source config, Conv2Former stages the outputs map to, expected channel
# arguments of the backbone's consumers, check size, slow)
FAMILIES = {
    'faster_rcnn': ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', (0, 1, 2, 3),
                    {'neck.in_channels': C}, 64, False),
    'mask_rcnn': ('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', (0, 1, 2, 3),
                  {'neck.in_channels': C}, 64, False),
    'retinanet': ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', (0, 1, 2, 3),
                  {'neck.in_channels': C}, 64, False),
    'fcos': ('mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', (0, 1, 2, 3),
             {'neck.in_channels': C}, 64, False),
    'rtmdet': ('mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py', (1, 2, 3),
               {'neck.in_channels': C[1:]}, 64, False),
    'solo': ('mmdet::solo/solo_r50_fpn_1x_coco.py', (0, 1, 2, 3), {'neck.in_channels': C}, 64, False),
    'deformable_detr': ('mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', (1, 2, 3),
                        {'neck.in_channels': C[1:]}, 64, False),
    # two-stage DINO ranks its 900 queries among the encoder's tokens: the
    # check raises the image side to 224 for enough of them (~40 s)
    'dino': ('mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', (1, 2, 3),
             {'neck.in_channels': C[1:]}, 64, True),
    'mask2former': ('mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py', (0, 1, 2, 3),
                    {'panoptic_head.in_channels': C}, 64, False),
    'fcn': ('mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py', (0, 1, 2, 3),
            {'decode_head.in_channels': C[3], 'auxiliary_head.in_channels': C[2]}, 64, False),
    'pspnet': ('mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', (0, 1, 2, 3),
               {'decode_head.in_channels': C[3], 'auxiliary_head.in_channels': C[2]}, 64, False),
    'deeplabv3plus': ('mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py', (0, 1, 2, 3),
                      {'decode_head.in_channels': C[3], 'decode_head.c1_in_channels': C[0],
                       'auxiliary_head.in_channels': C[2]}, 64, False),
    'upernet': ('mmseg::upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py', (0, 1, 2, 3),
                {'decode_head.in_channels': C, 'auxiliary_head.in_channels': C[2]}, 64, False),
    'segformer': ('mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py', (0, 1, 2, 3),
                  {'decode_head.in_channels': C}, 64, False),
    # ~30 s: 150 classes through mmdet's Mask2Former head
    'mask2former_seg': ('mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py', (0, 1, 2, 3),
                        {'decode_head.in_channels': C}, 64, True),
    'resnet_cls': ('mmpretrain::resnet/resnet50_8xb32_in1k.py', (3, ), {'head.in_channels': C[3]}, 64, False),
}


def _lookup(cfg, dotted):
    for key in dotted.split('.'):
        cfg = cfg[key]
    return cfg


@pytest.mark.parametrize('family', [pytest.param(k, marks=pytest.mark.slow) if v[4] else k
                                    for k, v in FAMILIES.items()])
def test_swapped_config_trains_and_predicts(family, tmp_path):
    src, stages, expected, size, _ = FAMILIES[family]
    library = src.split('::')[0]
    if library == 'mmpretrain':
        pytest.importorskip('mmpretrain')
    dst = tmp_path / f'{family}_conv2former.py'
    result = swap_backbone(src, TINY, str(dst))
    assert result.out_indices == stages
    text = dst.read_text()
    assert text.startswith('# ') and f"_base_ = '{src}'" in text and '_delete_=True' in text
    assert "'mmconv2former'" in text
    cfg = Config.fromfile(str(dst))
    backbone = cfg.model.backbone
    assert backbone.type == 'Conv2Former' and tuple(backbone.out_indices) == stages
    assert set(backbone) <= {'type', 'arch', 'out_indices', 'drop_path_rate', '_scope_'}  # nothing of the old one
    for key, value in expected.items():
        got = _lookup(cfg.model, key)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    # only the consumers changed: the heads behind a neck keep their widths
    src_cfg = Config.fromfile(resolve_config(src))
    if 'neck' in src_cfg.model:
        for head in ('rpn_head', 'bbox_head', 'roi_head', 'decode_head'):
            if head in src_cfg.model:
                assert cfg.model[head] == src_cfg.model[head], head
    pre = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor')
    assert list(pre.mean) == MEAN and list(pre.std) == STD
    assert pre.get('bgr_to_rgb', pre.get('to_rgb')) is True
    if library == 'mmseg':
        assert cfg.model.get('pretrained') is None

    out = check_config(str(dst), size=size)
    assert math.isfinite(out['loss'])
    assert out['predictions'] == 2 and out['params'] > out['backbone_params'] > 0


def test_dilated_segmentation_backbone_maps_by_position(tmp_path):
    result = swap_backbone(FAMILIES['pspnet'][0], 't', str(tmp_path / 'psp.py'))
    assert result.old_strides == [4, 8, 8, 8]
    assert result.out_indices == (0, 1, 2, 3) and result.new_channels == [72, 144, 288, 576]
    assert any('dilated' in n and '[4, 8, 16, 32]' in n for n in result.notes)
    assert 'dilated' in (tmp_path / 'psp.py').read_text()


@pytest.mark.parametrize('src, reason', [
    ('mmdet::faster_rcnn/faster-rcnn_r50-caffe_c4-1x_coco.py', 'roi_head reads the backbone directly'),
    ('mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py', 'strides [16, 16, 16, 16]'),
])
def test_refuses_what_it_cannot_map_and_writes_nothing(src, reason, tmp_path):
    dst = tmp_path / 'out.py'
    with pytest.raises(SwapError, match='nothing was written') as info:
        swap_backbone(src, 't', str(dst))
    assert any(reason in p for p in info.value.problems), info.value.problems
    assert 'by hand' in str(info.value)
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_stage_mapping():
    from mmconv2former.swap import map_stages
    assert map_stages([4, 8, 16, 32], 'mmdet')[0] == (0, 1, 2, 3)
    assert map_stages([8, 16, 32], 'mmdet')[0] == (1, 2, 3)  # CSPNeXt (2, 3, 4), ResNet (1, 2, 3)
    assert map_stages([32], 'mmpretrain')[0] == (3, )
    assert map_stages([8, 8], 'mmseg')[0] == (1, 2)
    # a dilated detector would change the strides its anchors are tied to
    assert 'dilated' in map_stages([4, 8, 8, 8], 'mmdet')[2][0]
    assert 'stride 2;' in map_stages([2, 4, 8], 'mmdet')[2][0]
    assert 'stride 64;' in map_stages([8, 16, 32, 64], 'mmdet')[2][0]


def test_never_overwrites_without_force(tmp_path, capsys):
    from tools.misc.swap_backbone import main
    dst = tmp_path / 'mine.py'
    dst.write_text('# my own config\n')
    src = FAMILIES['retinanet'][0]
    assert main([src, '--arch', 't', '-o', str(dst)]) == 2
    assert 'exists' in capsys.readouterr().err and dst.read_text() == '# my own config\n'
    with pytest.raises(FileExistsError):
        swap_backbone(src, 't', str(dst))
    # a refused swap leaves an existing file alone even with --force
    assert main(['mmdet::faster_rcnn/faster-rcnn_r50-caffe_c4-1x_coco.py', '--arch', 't', '-o', str(dst),
                 '--force']) == 2
    assert dst.read_text() == '# my own config\n'
    assert main([src, '--arch', 't', '-o', str(dst), '--force']) == 0
    assert Config.fromfile(str(dst)).model.backbone.type == 'Conv2Former'
    # the output can never be the source it inherits from
    local = tmp_path / 'local.py'
    local.write_text(dst.read_text())
    with pytest.raises(ValueError, match='source config itself'):
        swap_backbone(str(local), 't', str(local), force=True)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='config not found'):
        swap_backbone(str(tmp_path / 'nope.py'), 't', str(tmp_path / 'x.py'))
    with pytest.raises(FileNotFoundError, match='config not found'):
        swap_backbone('mmdet::nope/nope.py', 't', str(tmp_path / 'x.py'))
    with pytest.raises(KeyError, match='unknown Conv2Former arch'):
        swap_backbone(FAMILIES['retinanet'][0], 'xl', str(tmp_path / 'x.py'))
    with pytest.raises(ValueError, match='layer-decay'):
        swap_backbone(FAMILIES['retinanet'][0], 't', str(tmp_path / 'x.py'), layer_decay=1.5)
    with pytest.raises(FileNotFoundError, match='pretrained checkpoint not found'):
        swap_backbone(FAMILIES['retinanet'][0], 't', str(tmp_path / 'x.py'), pretrained=str(tmp_path / 'no.pth'))
    assert not (tmp_path / 'x.py').exists()


def _save_backbone(path, arch, prefix):
    from mmconv2former.models import Conv2Former
    state = Conv2Former(arch, out_norm=False).state_dict()
    torch.save({'state_dict': {prefix + k: v for k, v in state.items()}}, path)
    return str(path)


def test_pretrained_prefix_and_layer_decay(tmp_path):
    src = FAMILIES['retinanet'][0]
    det = _save_backbone(tmp_path / 'det.pth', TINY, 'backbone.')
    release = _save_backbone(tmp_path / 'release.pth', TINY, '')
    dst = tmp_path / 'a.py'
    swap_backbone(src, TINY, str(dst), pretrained=det, layer_decay=0.9)
    cfg = Config.fromfile(str(dst))
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=det, prefix='backbone.')
    assert cfg.optim_wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
    assert cfg.optim_wrapper.paramwise_cfg == dict(decay_rate=0.9, decay_type='layer_wise')
    assert cfg.optim_wrapper.optimizer.type == 'SGD'  # the source's optimiser is kept
    out = check_config(str(dst), size=64)  # loads the weights, builds our constructor, trains
    assert math.isfinite(out['loss'])
    swap_backbone(src, TINY, str(tmp_path / 'b.py'), pretrained=release)
    assert Config.fromfile(str(tmp_path / 'b.py')).model.backbone.init_cfg.prefix is None
    with pytest.raises(ValueError, match='pass the matching --arch'):
        swap_backbone(src, 'n', str(tmp_path / 'c.py'), pretrained=det)
    assert not (tmp_path / 'c.py').exists()


def test_convnext_only_decay_constructor_is_replaced(tmp_path):
    dst = tmp_path / 'cn.py'
    result = swap_backbone('mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py', TINY, str(dst))
    cfg = Config.fromfile(str(dst))
    assert cfg.optim_wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
    assert cfg.optim_wrapper.paramwise_cfg == dict(decay_rate=0.9, decay_type='stage_wise')
    assert result.out_indices == (0, 1, 2, 3)
    assert list(cfg.model.decode_head.in_channels) == C


def test_command_line_check_prints_params_and_flops(tmp_path, capsys):
    pytest.importorskip('mmpretrain')
    from tools.misc.swap_backbone import main
    dst = tmp_path / 'cls.py'
    assert main([FAMILIES['resnet_cls'][0], '--arch', 'n', '-o', str(dst), '--check', '--check-size', '64']) == 0
    out = capsys.readouterr().out
    assert f'wrote {dst}' in out and 'check: one training step' in out
    assert 'params:' in out and 'FLOPs:' in out and 'multiply-adds' in out
    assert osp.isfile(dst)
