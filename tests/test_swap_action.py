"""tools/misc/swap_backbone.py on mmaction2 configs: 2D recognizers (TSN,
TSM) swapped train one step and predict on synthetic clips; 3D backbones are
refused; configs/action/ is the tool's output plus pretrained weights."""
import math

import pytest
import torch
from mmengine.config import Config

from conftest import TINY, assert_shipped_config_is_swap_output
from mmconv2former.swap import MEAN, STD, SwapError, check_config, swap_backbone

pytest.importorskip('mmaction.models', reason='mmaction2 is not installed or does not import')
pytest.importorskip('mmpretrain')  # the swapped backbone is named in mmpretrain's scope

C = TINY['channels']
TSN = 'mmaction::recognition/tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb.py'
TSM = 'mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py'


@pytest.mark.parametrize('src', [TSN, TSM], ids=['tsn', 'tsm'])
def test_swapped_2d_recognizer_trains_and_predicts(src, tmp_path):
    dst = tmp_path / 'action.py'
    result = swap_backbone(src, TINY, str(dst))
    assert result.library == 'mmaction' and result.out_indices == (3, )
    cfg = Config.fromfile(str(dst))
    assert cfg.model.backbone.type == 'mmpretrain.Conv2Former'
    assert cfg.model.cls_head.in_channels == C[3]
    pre = cfg.model.data_preprocessor
    assert list(pre.mean) == MEAN and list(pre.std) == STD
    assert 'to_rgb' not in pre and pre.get('format_shape', 'NCHW') == 'NCHW'  # decoders give RGB
    if src == TSM:  # the temporal shift lived in the backbone; its optimiser constructor refuses LayerNorm
        assert any('num_segments=8' in n for n in result.notes)
        assert cfg.optim_wrapper.constructor == 'DefaultOptimWrapperConstructor'
        assert cfg.optim_wrapper.paramwise_cfg == dict(
            bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0,
            custom_keys={'cls_head.fc_cls.weight': dict(lr_mult=5.0),
                         'cls_head.fc_cls.bias': dict(lr_mult=10.0, decay_mult=0.0)})
    out = check_config(str(dst), size=64)
    assert math.isfinite(out['loss']) and out['predictions'] == 2


def test_backbone_sees_every_frame(tmp_path):
    """Recognizer2D runs the N*T frames of a batch through Conv2Former and the
    head averages the T segments."""
    from mmconv2former.engine.runtime import library_models, synthetic_batch
    swap_backbone(TSN, TINY, str(tmp_path / 'tsn.py'))
    cfg = Config.fromfile(str(tmp_path / 'tsn.py'))
    model = library_models('mmaction').build(cfg.model).eval()
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out[0].shape)))
    data = model.data_preprocessor(synthetic_batch(cfg.model, 'mmaction', 64, batch=3), training=False)
    with torch.no_grad():
        results = model(**data, mode='predict')
    assert data['inputs'].shape[:2] == (3, 2)
    assert seen == [((6, 3, 64, 64), (6, C[3], 2, 2))]
    assert [r.pred_score.shape for r in results] == [(400, )] * 3


@pytest.mark.parametrize('src, reason', [
    ('mmaction::recognition/i3d/i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb.py', 'NCTHW'),
    ('mmaction::recognition/slowfast/slowfast_r50_8xb8-4x16x1-256e_kinetics400-rgb.py', 'NCTHW'),
])
def test_refuses_3d_backbones_and_writes_nothing(src, reason, tmp_path):
    with pytest.raises(SwapError, match='nothing was written') as info:
        swap_backbone(src, 't', str(tmp_path / 'out.py'))
    assert any(reason in p and '2D backbone' in p for p in info.value.problems), info.value.problems
    assert not list(tmp_path.iterdir())


def test_shipped_config_is_the_tools_output_with_weights(tmp_path):
    shipped = assert_shipped_config_is_swap_output(
        'configs/action/tsn_imagenet-pretrained-conv2former-t_8xb32-1x1x3-100e_kinetics400-rgb.py',
        TSN, 'cls_head', tmp_path)
    from mmconv2former.engine.runtime import library_models
    model = library_models('mmaction').build(shipped.model)  # builds without the weights file
    assert model.backbone_from == 'mmpretrain' and model.cls_head.fc_cls.in_features == 576
