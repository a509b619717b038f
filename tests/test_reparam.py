"""The folded inference form (``Conv2Former.switch_to_deploy()``,
``mmconv2former/models/reparam.py``).

Folding must not change a number beyond float rounding (fp32 outputs within
1e-4 of the release-style reference), must keep the package's own modules, so
that hooks, tracers, FLOP counters and autocast see the same model, and is a
one-way step.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import TINY, assert_matches, count_flops, release_pair
from mmconv2former import Conv2Former
from mmconv2former.engine import SwitchToDeployHook
from mmconv2former.models.reparam import fold_bn_into_next_conv


def deployed(**kwargs):
    ours, ref = release_pair(**kwargs)
    assert ours.switch_to_deploy() is ours
    return ours, ref


def test_folded_model_matches_the_reference_and_leaves_the_input_alone():
    ours, ref = deployed()
    x = torch.randn(3, 3, 64, 64)
    x_before = x.clone()
    with torch.no_grad():
        assert_matches(ours(x), ref.forward_stages(x))
    assert torch.equal(x, x_before)
    with torch.inference_mode():
        assert_matches(ours(x), ref.forward_stages(x))


def test_folding_removes_layer_scales_and_the_stem_batchnorm_only():
    ours, _ = deployed()
    blocks = [block for stage in ours.stages for block in stage]
    assert all(b.layer_scale_1 is None and b.layer_scale_2 is None for b in blocks)
    assert not any('layer_scale' in name for name, _ in ours.named_parameters())
    stem = ours.downsample_layers[0]
    assert isinstance(stem[5], nn.Identity) and stem[6].bias is not None
    assert isinstance(stem[2], nn.BatchNorm2d)  # before a zero-padded conv: not folded


def test_hooks_fire_on_the_same_modules_after_folding():
    ours, _ = deployed()
    seen = []
    for name, module in ours.named_modules():
        if name.endswith(('attn.proj', 'mlp.fc2', 'attn.att.2')):
            module.register_forward_hook(lambda m, args, out, name=name: seen.append(name))
    with torch.no_grad():
        ours(torch.randn(1, 3, 64, 64))
    assert len(seen) == 3 * sum(TINY['depths'])


def test_folded_model_under_autograd_and_autocast():
    ours, ref = deployed()
    x = torch.randn(2, 3, 64, 64)
    assert_matches(ours(x), ref.forward_stages(x))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = ours(x)
    with torch.no_grad():
        for out, expected in zip(outs, ref.forward_stages(x)):
            assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_folding_keeps_the_fp32_residual_under_autocast():
    """Without layer scales nothing promotes the residual stream to fp32 any
    more; the backbone keeps it in the weights' dtype itself, so that under
    autocast the folded model computes what the trained one does."""
    trained, _ = release_pair()
    folded, _ = deployed()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        expected, outs = trained(x), folded(x)
    for out, ref in zip(outs, expected):
        assert out.dtype == ref.dtype == torch.float32
        assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_folded_model_traces_and_counts_the_same_flops():
    ours, ref = deployed()
    plain, _ = release_pair()
    x = torch.randn(1, 3, 64, 64)
    assert count_flops(ours, x) == count_flops(plain, x) > 0
    with torch.no_grad():
        traced = torch.jit.trace(ours, x, check_trace=False)
        assert_matches(traced(x), ref.forward_stages(x))


def test_switch_to_deploy_is_one_way_and_idempotent():
    ours, _ = deployed()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = ours(x)
    ours.switch_to_deploy()  # a second call is a no-op
    with torch.no_grad():
        for a, b in zip(ours(x), first):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match='deploy'):
        ours.train()
    ours.eval()  # evaluation mode stays allowed (test loops call it)
    assert not any(p.requires_grad for p in ours.parameters())
    # the folded weights belong to the model: changing them changes it
    with torch.no_grad():
        ours.stages[0][0].attn.proj.weight.mul_(2)
        assert not torch.allclose(ours(x)[0], first[0])


def test_folding_with_a_trained_batchnorm_and_out_norms():
    torch.manual_seed(0)
    model = Conv2Former(TINY, out_indices=(1, 3)).train()
    model(torch.randn(4, 3, 64, 64) * 3 + 1)  # moves the stem BatchNorm statistics
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        for a, b in zip(model(x), expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batchnorm_folds_in_place_and_only_into_an_unpadded_convolution():
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 2, stride=2, bias=False)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(), bn.bias.normal_()
    bn.eval()
    seen = []
    conv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(2, 4, 7, 9)  # odd sides: the last row and column are dropped either way
    with torch.no_grad():
        expected = conv(bn(x))
    fold_bn_into_next_conv(bn, conv)  # outside no_grad: the helper takes care of it
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    assert len(seen) == 2  # the same module, its hook kept
    for bad in (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 2, dilation=2), nn.Conv2d(4, 4, 1, groups=2)):
        with pytest.raises(ValueError, match='unpadded, ungrouped, undilated'):
            fold_bn_into_next_conv(bn, bad)


def test_deploy_hook_switches_after_loading_and_names_a_missing_backbone():
    detector = nn.Module()
    detector.backbone = Conv2Former(TINY).eval()
    SwitchToDeployHook().before_test(SimpleNamespace(model=detector))
    assert detector.backbone.deployed
    with pytest.raises(RuntimeError, match='no Conv2Former'):
        SwitchToDeployHook().before_test(SimpleNamespace(model=nn.Linear(2, 2)))
