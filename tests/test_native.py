"""The native kernels (models/native.py): the depthwise weight gradient and
the MLP's backward sweep give what PyTorch gives, are used only where they
apply, and fall back cleanly."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmconv2former import Conv2Former
from mmconv2former.models import native, recompute
from mmconv2former.models.layers import ConvNHWC
from test_block import relative_error
from test_conv2former import TINY

needs_kernel = pytest.mark.skipif(native.native_library() is None,
                                  reason='no C++ compiler: the native kernels cannot be built')


def reference_grads(x, weight, bias, grad_out):
    """Gradients from PyTorch's own convolution (oneDNN on CPU)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2,
                   groups=weight.shape[0]).permute(0, 2, 3, 1)
    out.backward(grad_out)
    return out, x.grad, weight.grad, bias.grad if bias is not None else None


def count_native_calls(monkeypatch) -> list:
    """``(kernel, channels, kernel size)`` of every depthwise weight gradient
    computed natively: by the depthwise kernel (``'dw'``), or, for the MLP's
    3x3, by the MLP's backward sweep (``'mlp'``)."""
    calls = []
    orig = native.native_weight_grad
    monkeypatch.setattr(native, 'native_weight_grad',
                        lambda x, grad, k: calls.append(('dw', x.shape[-1], k)) or orig(x, grad, k))
    orig_mlp = recompute.mlp_backward
    monkeypatch.setattr(recompute, 'mlp_backward', lambda f, grad, weight, bias: calls.append(
        ('mlp', f.shape[-1], weight.shape[-1])) or orig_mlp(f, grad, weight, bias))
    return calls


@needs_kernel
@pytest.mark.parametrize('shape,kernel', [
    ((2, 9, 13, 16), 3), ((1, 7, 7, 24), 11), ((3, 12, 10, 8), 7), ((2, 5, 6, 40), 13),
    ((2, 16, 16, 72), 11), ((1, 3, 20, 8), 5)], ids=str)
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('with_bias', [True, False])
def test_native_weight_gradient_equals_pytorch(shape, kernel, threads, with_bias):
    """Every kernel size the release uses (3, 7, 11) and others, maps smaller
    than the kernel, non-square maps, and more threads than rows of some images."""
    torch.manual_seed(0)
    n, h, w, c = shape
    x = torch.randn(shape)
    weight = torch.randn(c, 1, kernel, kernel)
    bias = torch.randn(c) if with_bias else None
    grad_out = torch.randn(shape)
    ref_out, ref_gx, ref_gw, ref_gb = reference_grads(x, weight, bias, grad_out)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        bs = bias.clone().requires_grad_() if with_bias else None
        assert native.native_applies(xs, ws)
        out = native.depthwise_conv_nhwc(xs, ws, bs)
        out.backward(grad_out)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out, ref_out)  # the forward pass is PyTorch's own
    assert relative_error(xs.grad, ref_gx) <= 1e-6
    assert relative_error(ws.grad, ref_gw) <= 1e-5
    if with_bias:
        assert relative_error(bs.grad, ref_gb) <= 1e-5


def mlp_middle_reference(f, grad_s, weight, bias):
    """``s = h + GELU(DW3x3(h) + bias)``, ``h = GELU(f)``, and its gradients, by
    autograd in float64."""
    f = f.double().requires_grad_()
    weight = weight.double().requires_grad_()
    bias = (bias if bias is not None else torch.zeros(weight.shape[0])).double().requires_grad_()
    h = F.gelu(f)
    q = F.conv2d(h.permute(0, 3, 1, 2), weight, bias, padding=1, groups=weight.shape[0])
    s = h + F.gelu(q.permute(0, 2, 3, 1))
    s.backward(grad_s.double())
    return s.detach(), f.grad, weight.grad, bias.grad


@needs_kernel
@pytest.mark.parametrize('shape', [
    (2, 9, 13, 16), (1, 1, 1, 8), (3, 2, 5, 24), (2, 6, 1, 48), (2, 7, 7, 96), (1, 17, 11, 32)],
    ids=str)
@pytest.mark.parametrize('threads', [1, 3])
@pytest.mark.parametrize('with_bias', [True, False])
def test_native_mlp_backward_equals_autograd(shape, threads, with_bias):
    """The MLP kernel against float64 autograd: one-pixel and one-row maps,
    channel counts that take each channel-block width (8, 16, 32), more
    threads than work items, with and without the 3x3 bias."""
    torch.manual_seed(0)
    c = shape[-1]
    f, grad_s = torch.randn(shape) * 2, torch.randn(shape)
    weight = torch.randn(c, 1, 3, 3) * 0.5
    bias = torch.randn(c) if with_bias else None
    expected = mlp_middle_reference(f, grad_s, weight, bias)
    assert native.mlp_backward_supported(f, weight)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        f_before = f.clone()
        got = native.mlp_backward(f, grad_s.clone(), weight, bias)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(f, f_before)
    for name, value, reference in zip(['s', 'grad_f', 'grad_w', 'grad_b'], got, expected):
        assert value.dtype == torch.float32 and value.shape == reference.shape, name
        assert relative_error(value.double(), reference) <= 2e-6, name


@needs_kernel
def test_native_mlp_backward_declines_what_it_does_not_compute():
    """Float64, other kernel sizes and channel counts not a multiple of 8 stay
    with PyTorch's operators."""
    f = torch.randn(1, 4, 4, 16)
    assert not native.mlp_backward_supported(f.double(), torch.randn(16, 1, 3, 3).double())
    assert not native.mlp_backward_supported(f, torch.randn(16, 1, 5, 5))
    assert not native.mlp_backward_supported(torch.randn(1, 4, 4, 12), torch.randn(12, 1, 3, 3))


@needs_kernel
@pytest.mark.parametrize('recompute', [True, 'selective', False])
def test_training_uses_the_native_kernel_and_inference_does_not(monkeypatch, recompute):
    """Every depthwise conv of every block, once per training step, with
    every ``recompute`` (the MLP's 3x3 by the MLP sweep where the explicit
    recomputation runs); none without grad, when tracing, under autocast, or
    in float64. (Only the backward pass differs: the forward is ``F.conv2d``
    in every case.)"""
    calls = count_native_calls(monkeypatch)
    model = Conv2Former(TINY, recompute=recompute).train()
    x = torch.randn(2, 3, 64, 64)
    sum(o.mean() for o in model(x)).backward()
    blocks = sum(TINY['depths'])
    assert [s[0] for s in calls if s[-1] == TINY['kernel_size']] == ['dw'] * blocks  # att.2
    # pos: the MLP's sweep in the explicit recomputation, the depthwise kernel otherwise
    assert [s[0] for s in calls if s[-1] == 3] == ['mlp' if recompute is True else 'dw'] * blocks
    calls.clear()
    with torch.no_grad():
        model(x)
        model.eval()(x)
    torch.jit.trace(model, x, check_trace=False)
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(x)
    model.double()(x.double())
    assert calls == []


def test_unsupported_shapes_and_switch_off_use_pytorch(monkeypatch):
    """Channel counts that are not a multiple of 8, and modules whose
    ``native_weight_grad`` is off, run ``F.conv2d`` itself."""
    calls = count_native_calls(monkeypatch)
    conv = ConvNHWC(12, 12, 5, padding=2, groups=12)
    assert conv.native_weight_grad
    conv(torch.randn(1, 6, 6, 12)).sum().backward()
    conv = ConvNHWC(16, 16, 5, padding=2, groups=16)
    conv.native_weight_grad = False
    conv(torch.randn(1, 6, 6, 16)).sum().backward()
    assert calls == []
    # strided, dilated, dense and padding-changing convs are never candidates
    for kwargs in (dict(stride=2, padding=2), dict(padding=4, dilation=2), dict(padding=0)):
        assert not ConvNHWC(16, 16, 5, groups=16, **kwargs).native_weight_grad
    assert not ConvNHWC(16, 16, 3, padding=1).native_weight_grad


def test_without_a_compiler_training_falls_back_with_a_note(tmp_path):
    """A compiler that fails (here: one that answers ``--version`` and then
    rejects the source), or MMCONV2FORMER_NATIVE=0, leaves PyTorch's kernel
    in place: a logged note, training works, no half-built file is left."""
    broken = tmp_path / 'broken-g++'
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "broken 1.0" && exit 0\n'
                      ': > "$(eval echo \\${$#})"\necho "error: rejected" >&2\nexit 1\n')
    broken.chmod(0o755)
    script = (
        'import torch\n'
        'from mmconv2former import Conv2Former\n'
        'from mmconv2former.models import native\n'
        'assert native.native_library() is None\n'
        'm = Conv2Former(dict(channels=[16, 32, 48, 64], depths=[1, 1, 1, 1], kernel_size=5)).train()\n'
        'sum(o.mean() for o in m(torch.randn(1, 3, 64, 64))).backward()\n'
        'assert all(p.grad is not None for p in m.parameters())\n')
    cache = tmp_path / 'cache'
    for env in ({'CXX': str(broken), 'MMCONV2FORMER_CACHE': str(cache)}, {'MMCONV2FORMER_NATIVE': '0'}):
        result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                                env={**os.environ, **env}, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        if 'CXX' in env:
            out = result.stdout + result.stderr
            assert 'could not build the native kernels' in out and 'rejected' in out
    assert cache.is_dir() and not list(cache.rglob('*.so'))  # the partial output was removed


@needs_kernel
def test_weights_changed_in_place_are_used_by_the_next_gradient():
    """No state kept between calls: after ``.data`` writes to the weight and
    the bias, the next backward pass gives PyTorch's gradients for the new
    values."""
    conv = ConvNHWC(16, 16, 7, padding=3, groups=16)
    x = torch.randn(1, 9, 9, 16, requires_grad=True)
    grad_out = torch.randn(1, 9, 9, 16)
    conv(x).backward(grad_out)
    conv.weight.data.mul_(-2)
    conv.bias.data.add_(1)
    x.grad = conv.weight.grad = conv.bias.grad = None
    (conv(x) ** 2).backward(grad_out)  # the weight gradient now depends on the bias
    ref = reference_grads(x, conv.weight, conv.bias, grad_out)
    out = ref[0]
    _, ref_gx, ref_gw, _ = reference_grads(x, conv.weight, conv.bias, 2 * out * grad_out)
    assert relative_error(x.grad, ref_gx) <= 1e-6
    assert relative_error(conv.weight.grad, ref_gw) <= 1e-5


@needs_kernel
def test_benchmark_probe_and_native_off_peer(monkeypatch):
    """``benchmark.py --wgrad-probe`` times both weight-gradient kernels at
    every stage, and both MLP backward passes; the ``native-off`` peer trains
    without any native kernel."""
    from test_block import load_benchmark
    benchmark = load_benchmark()
    result = benchmark.main(['--arch', 'n', '--batch', '1', '--input-size', '64', '--wgrad-probe',
                             '--repeats', '1', '--warmup', '0', '--iters', '1'])
    names = [r['name'] for r in result['wgrad_probe']]
    assert len(names) == 4 * (2 * 2 + 2) and all(r['ms'] > 0 for r in result['wgrad_probe'])
    assert 'stage 4 dw7x7 C=512 native' in names and 'stage 1 dw3x3 C=256 PyTorch' in names
    assert {'stage 2 dw3x3 C=512 MLP backward native',
            'stage 2 dw3x3 C=512 MLP backward PyTorch'} <= set(names)
    calls = count_native_calls(monkeypatch)
    model = benchmark.apply_variant(Conv2Former(TINY), 'native-off').train()
    sum(o.mean() for o in model(torch.randn(1, 3, 64, 64))).backward()
    assert calls == []
