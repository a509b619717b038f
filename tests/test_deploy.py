"""The explicit fast inference form (``Conv2Former.switch_to_deploy()``).

Folding and the CPU fast path must not change a number beyond float
rounding: fp32 outputs within 1e-4 of the release-style reference, on every
path (oneDNN's private fused kernels, their public fallback, image groups of
any size, autograd, autocast, tracing), and the caller's input untouched.
"""
import pytest
import torch
import torch.nn as nn

from mmconv2former import Conv2Former
from mmconv2former.models import deploy
from test_conv2former import TINY
from test_block import assert_matches, assert_traces_with_plain_ops, count_flops, pair


def deployed(**kwargs):
    ours, ref = pair(**kwargs)
    assert ours.switch_to_deploy() is ours
    return ours, ref


@pytest.mark.parametrize('group_pixels', [1, 10 ** 9], ids=['one-image-groups', 'whole-batch'])
@pytest.mark.parametrize('kernels', ['onednn', 'public', 'no-private-api'])
@pytest.mark.parametrize('fuse_linear_gelu', [False, True], ids=['gemm-then-gelu', 'fused-gemm-gelu'])
def test_fast_path_matches_reference(group_pixels, kernels, fuse_linear_gelu, monkeypatch):
    """Every combination runs on any CPU: oneDNN's fused kernels, the public
    ops with oneDNN switched off, and a torch without the private ops."""
    monkeypatch.setattr(deploy, 'CPU_GROUP_PIXELS', group_pixels)
    monkeypatch.setattr(deploy, 'FUSE_LINEAR_GELU', fuse_linear_gelu)
    monkeypatch.setattr(deploy, 'USE_ONEDNN', kernels == 'onednn')
    if kernels == 'no-private-api':
        monkeypatch.setattr(deploy, '_private_ops', lambda: None)
    ours, ref = deployed()
    x = torch.randn(3, 3, 64, 64)
    x_before = x.clone()
    with torch.no_grad():
        assert_matches(ours(x), ref.forward_stages(x))
    assert torch.equal(x, x_before)  # in-place work never touches the caller's tensor
    with torch.inference_mode():
        assert_matches(ours(x), ref.forward_stages(x))


def test_onednn_kernels_serve_the_fast_path_only():
    from torch.profiler import ProfilerActivity, profile
    if deploy._private_ops() is None or not torch.backends.mkldnn.is_available():
        pytest.skip('this torch has no oneDNN fused kernels')
    ours, _ = deployed()
    x = torch.randn(1, 3, 64, 64)

    def kernels(grad=False, autocast=False):
        with torch.set_grad_enabled(grad), torch.autocast('cpu', torch.bfloat16, enabled=autocast):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                ours(x)
        return {e.key for e in prof.key_averages() if e.key.startswith('mkldnn::')}

    assert 'mkldnn::_linear_pointwise' in kernels()
    assert not kernels(grad=True)
    assert not kernels(autocast=True)  # they would bypass autocast and run in fp32


def test_deployed_model_under_autograd_and_autocast():
    ours, ref = deployed()
    x = torch.randn(2, 3, 64, 64)
    assert_matches(ours(x), ref.forward_stages(x))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = ours(x)
    with torch.no_grad():
        for out, expected in zip(outs, ref.forward_stages(x)):
            assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_deployed_model_traces_and_counts_flops_with_plain_ops():
    ours, ref = deployed()
    plain, _ = pair()
    x = torch.randn(1, 3, 64, 64)
    assert count_flops(ours, x) == count_flops(plain, x) > 0
    assert_traces_with_plain_ops(ours, ref, x)


def test_deploy_is_one_way_and_idempotent():
    ours, ref = deployed()
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
    stem = ours.downsample_layers[0]
    assert isinstance(stem, deploy.DeployStem) and stem.layers[5].bias is not None
    assert isinstance(stem.layers[2], nn.BatchNorm2d)  # before a zero-padded conv: not folded
    # the folded weights belong to the deployed model: changing them changes it
    with torch.no_grad():
        ours.stages[0].blocks[0].proj_weight.mul_(2)
        assert not torch.allclose(ours(x)[0], first[0])


def test_deploy_works_with_a_trained_batchnorm_and_out_norms():
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



def test_deploy_hook_switches_after_loading_and_names_a_missing_backbone():
    from types import SimpleNamespace
    from mmconv2former.engine import SwitchToDeployHook
    detector = nn.Module()
    detector.backbone = Conv2Former(TINY).eval()
    SwitchToDeployHook().before_test(SimpleNamespace(model=detector))
    assert detector.backbone.deployed
    with pytest.raises(RuntimeError, match='no Conv2Former'):
        SwitchToDeployHook().before_test(SimpleNamespace(model=nn.Linear(2, 2)))
