"""``mmconv2former.engine.breakdown``: one profiled step split by operator
kind and pass (what ``tools/analysis/gpu_benchmark.py`` prints as "where the
time goes")."""
import pytest
import torch
import torch.nn as nn
from conftest import TINY

from mmconv2former.engine.breakdown import OPTIMISER, operator_kind, step_breakdown
from mmconv2former.engine.profiling import build_conv2former, make_step


@pytest.mark.parametrize('name,shapes,kind', [
    ('aten::convolution', [[2, 72, 56, 56], [72, 1, 11, 11], [72]], 'depthwise conv 11x11'),
    ('aten::convolution_backward', [[2, 288, 56, 56], [2, 288, 56, 56], [288, 1, 3, 3]], 'depthwise conv 3x3'),
    ('aten::convolution', [[2, 3, 224, 224], [36, 3, 3, 3], []], 'dense conv'),
    ('aten::convolution', [[2, 72, 56, 56], [72, 1, 1, 1], []], 'dense conv'),  # grouped 1x1: no window
    ('aten::linear', [[2, 56, 56, 72], [72, 72], [72]], 'matrix products'),
    ('aten::native_layer_norm_backward', [], 'layer norm'),
    ('aten::gelu_backward', [], 'GELU'),
    ('aten::_fused_adamw_', [], OPTIMISER),
    ('aten::mul', [[2, 3], [2, 3]], None),
    # The Triton operators (mmconv2former/ops): forward, input gradient, weight gradient.
    ('mmconv2former::depthwise_conv_nhwc', [[2, 1, 7, 72], [72, 1, 11, 11], [72]], 'depthwise conv 11x11 (Triton)'),
    ('mmconv2former::depthwise_conv_nhwc_input_grad', [[2, 7, 7, 72], [72, 1, 3, 3]], 'depthwise conv 3x3 (Triton)'),
    ('mmconv2former::depthwise_conv_nhwc_weight_grad', [[2, 7, 7, 72], [2, 7, 7, 72], [72, 1, 11, 11]],
     'depthwise conv 11x11 (Triton)'),
])
def test_operator_kinds(name, shapes, kind):
    assert operator_kind(name, shapes) == kind


def test_a_recomputed_triton_forward_is_told_from_its_gradients():
    from mmconv2former.engine.breakdown import _phase
    assert _phase('mmconv2former::depthwise_conv_nhwc', in_backward=True) == 'recomputed'
    assert _phase('mmconv2former::depthwise_conv_nhwc_input_grad', in_backward=True) == 'backward'
    assert _phase('mmconv2former::depthwise_conv_nhwc', in_backward=False) == 'forward'


def _breakdown(**kwargs):
    model = build_conv2former(dict(TINY, depths=[1, 1, 1, 1]), **kwargs).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    step = make_step(model, x, training=True)
    step()
    return step_breakdown(step, 'cpu')


def test_training_step_is_split_by_kind_and_pass():
    result = _breakdown(recompute=False)
    kinds = result['kinds']
    assert not result['device_time']
    # TINY's kernel is 5x5; the MLP's is 3x3; every kind of the block shows in both passes.
    for kind in ('depthwise conv 5x5', 'depthwise conv 3x3', 'dense conv', 'matrix products', 'layer norm',
                 'GELU', 'batch norm'):
        assert kinds.get(f'{kind}, forward', 0) > 0 and kinds.get(f'{kind}, backward', 0) > 0, kind
    assert kinds[OPTIMISER] > 0
    assert not any(k.endswith('recomputed') for k in kinds)  # recompute=False stores everything
    assert result['total_ms'] == pytest.approx(sum(kinds.values()))
    assert list(kinds.values()) == sorted(kinds.values(), reverse=True)
    assert result['kernels'] and all(k['ms'] > 0 and k['calls'] > 0 for k in result['kernels'])


def test_selective_checkpointing_shows_as_recomputed_forward_work():
    """recompute=True redoes the norms, GELUs and the 3x3 convolution in the
    backward pass; the matrix products it stores are not run again (on a CPU
    their cached replay costs only Python time)."""
    kinds = _breakdown(recompute=True)['kinds']
    for kind in ('depthwise conv 3x3', 'layer norm', 'GELU'):
        assert kinds.get(f'{kind}, recomputed', 0) > 0, kind


def test_inference_step_has_forward_work_only():
    model = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.GELU())
    step = make_step(model, torch.randn(1, 8, 16, 16), training=False)
    kinds = step_breakdown(step, 'cpu')['kinds']
    assert set(kinds) <= {'depthwise conv 7x7, forward', 'GELU, forward', 'casts and copies, forward',
                          'other (elementwise, reductions, ...)'}
    assert kinds['depthwise conv 7x7, forward'] > 0
