"""Behaviour of the Conv2Former backbone: architecture, options, loading."""
import copy

import pytest
import torch
import torch.nn as nn

from mmconv2former import Conv2Former
from mmconv2former.checkpoint import CheckpointMismatchError
from mmconv2former.models.layers import LayerNorm2d
from conftest import TINY, randomise
from reference import ReferenceChannelNorm, ReferenceConv2Former

# The release's backbone without classifier (head.*, pred.*) and without our
# optional output norms, in millions of parameters.
RELEASE_BACKBONE_PARAMS = {'n': 13.05, 't': 24.68, 's': 48.01, 'b': 87.76, 'b_22k': 86.52, 'l': 196.30}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('arch', list(RELEASE_BACKBONE_PARAMS))
def test_parameter_counts_equal_release(arch):
    model = Conv2Former(arch, out_norm=False)
    assert round(n_params(model) / 1e6, 2) == RELEASE_BACKBONE_PARAMS[arch]
    ref = ReferenceConv2Former(**{k: Conv2Former.arch_settings[arch][k]
                                  for k in ('channels', 'depths', 'kernel_size')})
    ref_backbone = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith(('head.', 'pred.'))}
    assert {k: v.shape for k, v in model.state_dict().items()} == ref_backbone


@pytest.mark.parametrize('arch', ['n', 't', 's', 'b', 'b_22k', 'l'])
def test_output_shapes_and_strides(arch):
    settings = Conv2Former.arch_settings[arch]
    # Shallow copies of each variant keep this fast; widths and kernels are real.
    model = Conv2Former(dict(settings, depths=[1, 1, 1, 1])).eval()
    outs = model(torch.randn(1, 3, 64, 96))
    assert len(outs) == 4
    for out, c, s in zip(outs, settings['channels'], (4, 8, 16, 32)):
        assert out.shape == (1, c, 64 // s, 96 // s)
    assert model.out_channels == tuple(settings['channels'])
    assert model.out_strides == (4, 8, 16, 32)
    assert model.kernel_size == settings['kernel_size']
    assert model.stages[0][0].attn.att[2].weight.shape[-1] == settings['kernel_size']


def test_sides_not_multiple_of_32_follow_floor_division():
    model = Conv2Former(TINY).eval()
    ref = randomise(ReferenceConv2Former(**TINY)).eval()
    model.load_state_dict({k: v for k, v in ref.state_dict().items()
                           if not k.startswith(('head.', 'pred.'))}, strict=False)
    x = torch.randn(2, 3, 77, 50)
    outs = model(x)
    # conv3x3 s2 p1 -> ceil, then conv2x2 s2 -> floor, and so on.
    assert [o.shape[-2:] for o in outs] == [r.shape[-2:] for r in ref.forward_stages(x)]
    assert outs[0].shape[-2:] == (19, 12)


def test_matches_release_style_reference_numerically():
    model = Conv2Former(TINY, out_norm=False).eval()
    ref = randomise(ReferenceConv2Former(**TINY)).eval()
    model.load_state_dict(
        {k: v for k, v in ref.state_dict().items() if not k.startswith(('head.', 'pred.'))}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    for ours, theirs in zip(model(x), ref.forward_stages(x)):
        assert theirs.abs().max() > 0.1  # the comparison is not between zeros
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_layer_norm_2d_matches_release_norm():
    x = torch.randn(2, 8, 5, 7) * 30 + 3
    ours, theirs = LayerNorm2d(8, eps=1e-6), ReferenceChannelNorm(8)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert isinstance(ours, nn.LayerNorm)


@pytest.mark.parametrize('out_indices, expected', [((3,), (3,)), ((-1, 0), (0, 3)), ([1, 2], (1, 2)), (2, (2,))])
def test_out_indices(out_indices, expected):
    given = copy.deepcopy(out_indices)
    model = Conv2Former(TINY, out_indices=out_indices).eval()
    assert out_indices == given  # the caller's value is not mutated
    assert model.out_indices == expected
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [TINY['channels'][i] for i in expected]
    assert model.out_channels == tuple(TINY['channels'][i] for i in expected)
    # an output norm exists exactly for the returned stages
    assert [isinstance(n, nn.LayerNorm) for n in model.out_norms] == [i in expected for i in range(4)]


def test_out_norm_normalises_outputs():
    model = randomise(Conv2Former(TINY, out_norm=True)).eval()
    for norm in model.out_norms:
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
    for out in model(torch.randn(2, 3, 64, 64)):
        torch.testing.assert_close(out.mean(1), torch.zeros_like(out.mean(1)), atol=1e-4, rtol=0)
    assert not any(isinstance(n, nn.LayerNorm) for n in Conv2Former(TINY, out_norm=False).out_norms)


@pytest.mark.parametrize('arch, error, text', [
    ('x', KeyError, "'b_22k'"),
    (dict(channels=[8, 16, 32, 64], depths=[1, 1, 1]), ValueError, 'kernel_size'),
    (dict(channels=[8, 16, 32], depths=[1, 1, 1], kernel_size=3), ValueError, '4 stages'),
    (dict(channels=[8, 16, 32, 64], depths=[1, 1, 1, 2, 3], kernel_size=3), ValueError, 'equal length'),
    (dict(channels=[8, 16, 32, 64], depths=[1, 1, 1, 1], kernel_size=4), ValueError, 'odd'),
    (dict(channels=[8, 16, 32, 64], depths=[1, 1, 1, 1], kernel_size=3, heads=2), ValueError, 'heads'),
    (7, TypeError, 'str or dict'),
])
def test_bad_arch_raises_with_choices(arch, error, text):
    with pytest.raises(error, match=text):
        Conv2Former(arch)


@pytest.mark.parametrize('kwargs, text', [
    (dict(out_indices=(4,)), 'out of range'),
    (dict(out_indices=(0, -4)), 'duplicates'),
    (dict(out_indices=()), 'non-empty'),
    (dict(frozen_stages=5), 'frozen_stages'),
    (dict(drop_path_rate=1.0), 'drop_path_rate'),
    (dict(in_channels=0), 'in_channels'),
])
def test_bad_options_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        Conv2Former(TINY, **kwargs)


def test_arch_names_are_case_and_dash_insensitive_and_dict_is_copied():
    assert Conv2Former('B-22K').kernel_size == 7
    arch = dict(TINY)
    model = Conv2Former(arch)
    model.arch['depths'].append(9)
    assert arch['depths'] == TINY['depths']


def test_bad_input_errors_name_the_fix():
    model = Conv2Former(TINY).eval()
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*RGB'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='smaller than the total stride 32'):
        model(torch.randn(1, 3, 16, 64))
    grey = Conv2Former(TINY, in_channels=1).eval()
    assert grey(torch.randn(1, 1, 32, 32))[0].shape == (1, 16, 8, 8)


@pytest.mark.parametrize('frozen', [1, 2, 4])
def test_frozen_stages_stay_frozen_after_train(frozen):
    model = Conv2Former(TINY, frozen_stages=frozen)
    model.train()
    for i in range(4):
        modules = (model.downsample_layers[i], model.stages[i], model.out_norms[i])
        params = [p for m in modules for p in m.parameters()]
        assert all(not p.requires_grad for p in params) == (i < frozen)
        assert all(p.requires_grad for p in params) == (i >= frozen)
        assert all(not m.training for m in modules) == (i < frozen)
    # frozen weights do not move under an optimiser step
    stem_bn = model.downsample_layers[0][2]
    before = stem_bn.running_mean.clone(), model.stages[0][0].layer_scale_1.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = sum(o.sum() for o in model(torch.randn(2, 3, 64, 64)))
    if frozen == 4:
        assert not trainable and not loss.requires_grad
    else:
        opt = torch.optim.SGD(trainable, lr=1.0)
        loss.backward()
        opt.step()
    assert torch.equal(stem_bn.running_mean, before[0])
    assert torch.equal(model.stages[0][0].layer_scale_1, before[1])


def test_norm_eval_keeps_batchnorm_statistics():
    model = Conv2Former(TINY, norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 and all(not bn.training for bn in bns)
    before = [bn.running_mean.clone() for bn in bns]
    model(torch.randn(2, 3, 64, 64) * 5 + 2)
    assert all(torch.equal(bn.running_mean, b) for bn, b in zip(bns, before))
    assert model.stages[0].training  # the rest keeps training mode
    plain = Conv2Former(TINY, norm_eval=False).train()
    plain(torch.randn(2, 3, 64, 64) * 5 + 2)
    assert not torch.equal(plain.downsample_layers[0][2].running_mean, torch.zeros(8))


def test_with_cp_equals_plain_and_reaches_every_parameter():
    torch.manual_seed(0)
    plain = randomise(Conv2Former(TINY, drop_path_rate=0.0))
    ckpt = Conv2Former(TINY, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    plain.train()
    ckpt.train()
    x = torch.randn(2, 3, 64, 64)
    out_p, out_c = plain(x), ckpt(x)
    for a, b in zip(out_p, out_c):
        torch.testing.assert_close(a, b)
    sum((o ** 2).mean() for o in out_p).backward()
    sum((o ** 2).mean() for o in out_c).backward()
    for (name, pp), (_, pc) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert pc.grad is not None and pc.grad.abs().sum() > 0, f'no gradient reached {name}'
        torch.testing.assert_close(pc.grad, pp.grad, atol=1e-5, rtol=1e-4)


def test_drop_path_linear_and_inactive_in_eval():
    model = Conv2Former(TINY, drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0
             for stage in model.stages for b in stage]
    expected = torch.linspace(0, 0.3, sum(TINY['depths'])).tolist()
    assert rates == pytest.approx(expected)
    randomise(model)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    a, b = model(x), model(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    model.train()
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    d = model(x)
    assert not torch.equal(c[-1], d[-1])  # stochastic while training


def test_layer_scale_and_init():
    model = Conv2Former(TINY, layer_scale_init_value=1e-6)
    model.init_weights()
    ls = model.stages[2][1].layer_scale_2
    assert ls.shape == (48,) and torch.all(ls == 1e-6)
    w = model.stages[1][0].mlp.fc1.weight
    # the release's trunc_normal_(std=.02) keeps timm's absolute bounds [-2, 2]
    assert 0.018 < w.std() < 0.022 and w.abs().mean() > 0.01
    assert torch.all(model.stages[1][0].mlp.fc1.bias == 0)


def test_get_layer_depth_follows_real_depths():
    for arch, expected_groups in [('n', 6), ('t', 7), ('s', 14), ('b', 15), ('l', 19)]:
        model = Conv2Former(arch)
        last_block = f'backbone.stages.2.{model.depths[2] - 1}.mlp.fc1.weight'
        layer_id, num_layers = model.get_layer_depth(last_block, 'backbone.')
        assert num_layers == expected_groups + 2
        assert layer_id == expected_groups - 1  # the last group of stage 3 sits below stage 4
    model = Conv2Former('b')
    depth = model.get_layer_depth
    assert depth('backbone.downsample_layers.0.0.weight', 'backbone.')[0] == 0
    assert depth('backbone.stages.0.1.attn.v.weight', 'backbone.')[0] == 1
    assert depth('backbone.downsample_layers.2.1.weight', 'backbone.')[0] == 3
    assert depth('backbone.stages.3.0.layer_scale_1', 'backbone.')[0] == 15
    assert depth('neck.lateral_convs.0.conv.weight', 'backbone.') == (16, 17)
    # stage-wise: one id per stage
    assert depth('backbone.stages.2.30.mlp.fc1.weight', 'backbone.', stage_wise=True) == (3, 7)
    assert depth('backbone.downsample_layers.3.1.weight', 'backbone.', stage_wise=True) == (4, 7)


# ----------------------------------------------------------------------------- checkpoints
def _release_state(arch_dict, seed):
    return randomise(ReferenceConv2Former(**arch_dict), seed).state_dict()


@pytest.mark.parametrize('use_ema', [False, True])
def test_release_checkpoint_round_trip(release_checkpoint, use_ema):
    plain, ema = _release_state(TINY, 1), _release_state(TINY, 2)
    path = release_checkpoint(plain, ema)
    model = Conv2Former(TINY, init_cfg=dict(type='Pretrained', checkpoint=path, use_ema=use_ema))
    model.init_weights()
    expected = ema if use_ema else plain
    for k, v in model.state_dict().items():
        if k.startswith('out_norms.'):
            continue
        assert torch.equal(v, expected[k]), k
    missing, unexpected = model.load_release_weights(path, use_ema=use_ema)
    assert missing and all(k.startswith('out_norms.') for k in missing)
    assert unexpected == []  # head.* / pred.* are ignored, not reported


def test_release_checkpoint_with_ddp_and_backbone_prefixes(release_checkpoint):
    plain = _release_state(TINY, 3)
    path = release_checkpoint({f'module.{k}': v for k, v in plain.items()})
    model = Conv2Former(TINY, out_norm=False)
    missing, unexpected = model.load_release_weights(path)
    assert missing == [] and unexpected == []
    det_path = release_checkpoint({f'backbone.{k}': v for k, v in plain.items()} |
                                  {'neck.conv.weight': torch.zeros(1)}, name='det.pth')
    model = Conv2Former(TINY, out_norm=False)
    assert model.load_release_weights(det_path, prefix='backbone.') == ([], [])
    assert torch.equal(model.stages[2][2].mlp.pos.weight, plain['stages.2.2.mlp.pos.weight'])


def test_pretrained_argument_is_deprecated_alias(release_checkpoint):
    path = release_checkpoint(_release_state(TINY, 4))
    with pytest.warns(DeprecationWarning, match='init_cfg'):
        model = Conv2Former(TINY, pretrained=path)
    assert model.init_cfg == dict(type='Pretrained', checkpoint=path)
    model.init_weights()
    assert torch.equal(model.downsample_layers[0][0].weight,
                       torch.load(path, weights_only=False)['state_dict']['downsample_layers.0.0.weight'])
    with pytest.raises(ValueError, match='not both'):
        Conv2Former(TINY, pretrained=path, init_cfg=dict(type='Pretrained', checkpoint=path))


def test_kernel_or_width_mismatch_names_shapes_and_variant(release_checkpoint):
    n_state = ReferenceConv2Former(**{k: Conv2Former.arch_settings['n'][k]
                                      for k in ('channels', 'depths', 'kernel_size')}).state_dict()
    path = release_checkpoint(n_state)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint .* vs model .*arch='n'"):
        Conv2Former('t').load_release_weights(path)
    b22k = dict(Conv2Former.arch_settings['b_22k'], depths=[1, 1, 1, 1])
    path = release_checkpoint(ReferenceConv2Former(**b22k).state_dict(), name='b22k.pth')
    with pytest.raises(CheckpointMismatchError, match=r'\(96, 1, 7, 7\) vs model \(96, 1, 11, 11\).*kernel_size=7'):
        Conv2Former(dict(Conv2Former.arch_settings['b'], depths=[1, 1, 1, 1])).load_release_weights(path)


def test_deeper_checkpoint_is_refused(release_checkpoint):
    path = release_checkpoint(_release_state(dict(TINY, depths=[1, 2, 4, 1]), 5))
    with pytest.raises(ValueError, match='blocks this model lacks'):
        Conv2Former(TINY).load_release_weights(path)


def test_missing_checkpoint_and_missing_ema_are_clear(tmp_path, release_checkpoint):
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        Conv2Former(TINY).load_release_weights(str(tmp_path / 'nope.pth'))
    path = release_checkpoint(_release_state(TINY, 6))
    with pytest.raises(KeyError, match='state_dict_ema'):
        Conv2Former(TINY).load_release_weights(path, use_ema=True)


# ----------------------------------------------------------------------------- registries
def test_builds_from_every_registry():
    from mmdet.registry import MODELS as DET
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as CLS
    from mmseg.registry import MODELS as SEG

    from mmconv2former.registry import MODELS as OWN
    for scope, registry in (('mmdet', DET), ('mmseg', SEG), ('mmpretrain', CLS), ('mmconv2former', OWN)):
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(dict(type='Conv2Former', arch=TINY, out_indices=(1, 3)))
        assert isinstance(model, Conv2Former) and model.out_indices == (1, 3)
    with DefaultScope.overwrite_default_scope('mmdet'):
        assert isinstance(DET.build(dict(type='mmconv2former.Conv2Former', arch=TINY)), Conv2Former)
