"""The Triton depthwise operator run by Triton's interpreter on a CPU.

Not collected by a plain ``pytest`` run (the file name does not start with
``test_``): the interpreter must be chosen before the kernels are defined, so
``tests/test_triton_depthwise.py`` runs this file in a child ``pytest`` with
``TRITON_INTERPRET=1``. Shapes are tiny: the interpreter runs each program in
Python.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, relative_error

from mmconv2former.models import Conv2Former, ConvNHWC
from mmconv2former.ops import depthwise_conv as dw

if os.environ.get('TRITON_INTERPRET') != '1' or not dw.AVAILABLE:
    pytest.skip('run by tests/test_triton_depthwise.py with TRITON_INTERPRET=1', allow_module_level=True)

#: Four stages of one block each; the MLP's 4x width stays one channel block.
ARCH = dict(channels=[8, 8, 16, 16], depths=[1, 1, 1, 1], kernel_size=5)


def nhwc(*shape, **kwargs) -> torch.Tensor:
    return torch.randn(*shape, **kwargs)


@pytest.mark.parametrize('k,bias,shape', [(5, True, (2, 7, 9, 40)), (3, False, (1, 5, 21, 24)),
                                          (7, True, (1, 3, 8, 33))])
def test_operator_matches_conv2d_forward_and_backward(k, bias, shape):
    """Output, input, weight and bias gradients against ``F.conv2d`` in fp32;
    widths (one over two column blocks) and channel counts that are not
    multiples of the kernels' blocks."""
    c = shape[-1]
    x = nhwc(*shape).requires_grad_()
    w = torch.randn(c, 1, k, k, requires_grad=True)
    b = torch.randn(c, requires_grad=True) if bias else None
    dy = torch.randn(shape)
    y = dw.depthwise_conv_nhwc(x, w, b)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    y2 = F.conv2d(x2.permute(0, 3, 1, 2), w2, b2, padding=k // 2, groups=c).permute(0, 2, 3, 1)
    want = torch.autograd.grad(y2, [t for t in (x2, w2, b2) if t is not None], dy)
    assert relative_error(y, y2) < 1e-6
    for got, expected in zip(grads, want):
        assert got.shape == expected.shape and relative_error(got, expected) < 1e-5


@pytest.mark.parametrize('config', [dw.FORWARD_CONFIG, (4, 8, 16, 2)])
def test_forward_kernel_writes_every_element_of_its_output(config):
    """Into an output filled with NaN first, since fresh memory may still hold
    an earlier call's right answer: every element written, and right, for the
    forward pass and the input gradient, in one-row and multi-row block shapes,
    with heights, widths and channels that are not multiples of the blocks."""
    x, w, b = nhwc(2, 7, 9, 40), torch.randn(40, 1, 5, 5), torch.randn(40)
    nchw = x.permute(0, 3, 1, 2)
    cases = [(dw.forward_nhwc, (x, w, b, config), F.conv2d(nchw, w, b, padding=2, groups=40)),
             (dw.input_grad_nhwc, (x, w, config), F.conv2d(nchw, w.flip(-1, -2), padding=2, groups=40))]
    for fn, args, want in cases:
        out = torch.full_like(x, float('nan'))
        got = fn(*args, out=out)
        assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
        assert relative_error(got, want.permute(0, 2, 3, 1)) < 1e-6


@pytest.mark.parametrize('k,config,programs', [(11, dw.WEIGHT_GRAD_CONFIG, None), (5, (4, 16, 2), 5)])
def test_weight_gradient_sums_every_tap(k, config, programs):
    """Against PyTorch's weight gradient in fp32: the taps go to programs in
    blocks of K rounded up to a power of two, in flat order (K = 11: eight
    blocks of 16 for 121 taps; K = 5: four of 8 for 25, the last with one),
    so blocks span two kernel rows and the last is short; an image shorter
    than the 11x11 kernel, so that some taps meet image rows only for some
    output rows; rows split unevenly across programs (``programs=5``)."""
    x, dy = nhwc(2, 7, 13, 20), nhwc(2, 7, 13, 20)
    want = torch.nn.grad.conv2d_weight(x.permute(0, 3, 1, 2), (20, 1, k, k), dy.permute(0, 3, 1, 2),
                                       padding=k // 2, groups=20)
    got = dw.weight_grad_nhwc(x, dy, k, config, programs)
    assert got.shape == want.shape and relative_error(got, want) < 1e-5


def test_an_output_that_does_not_fit_is_refused_by_name():
    x, w = nhwc(1, 5, 6, 16), torch.randn(16, 1, 3, 3)
    for out, problem in ((torch.empty(1, 5, 6, 8), r'\(1, 5, 6, 8\)'), (torch.empty(1, 5, 6, 16).double(), 'float64'),
                         (torch.empty(1, 6, 5, 16).transpose(1, 2), 'not contiguous')):
        with pytest.raises(ValueError, match=problem):
            dw.forward_nhwc(x, w, out=out)


def test_autocast_casts_as_for_a_convolution():
    """Under bf16 autocast: bf16 output, and gradients (through the casts to
    the fp32 parameters) close to PyTorch's bf16 convolution's."""
    conv = ConvNHWC(24, 24, 5, padding=2, groups=24, depthwise_impl='triton')
    ref = ConvNHWC(24, 24, 5, padding=2, groups=24)
    ref.load_state_dict(conv.state_dict())
    x = nhwc(2, 6, 6, 24)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, y_ref = conv(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert relative_error(y, y_ref) < 1e-2
    dy = torch.randn(y.shape)
    y.float().backward(dy)
    y_ref.float().backward(dy)
    for got, want in ((conv.weight.grad, ref.weight.grad), (conv.bias.grad, ref.bias.grad)):
        assert got.dtype == torch.float32 and relative_error(got, want) < 2e-2


def test_operators_pass_torch_library_opcheck():
    """Schemas, fake (shape) functions with the real outputs' strides, and the
    autograd registration, as torch.compile relies on them."""
    x, w, b = nhwc(1, 5, 6, 16), torch.randn(16, 1, 3, 3), torch.randn(16)
    torch.library.opcheck(torch.ops.mmconv2former.depthwise_conv_nhwc.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    dy = torch.randn(1, 5, 6, 16)
    torch.library.opcheck(torch.ops.mmconv2former.depthwise_conv_nhwc_input_grad.default, (dy, w.detach()))
    torch.library.opcheck(torch.ops.mmconv2former.depthwise_conv_nhwc_weight_grad.default,
                          (x.detach(), dy, w.detach()))


def _pair(**kwargs):
    torch_model = randomise(Conv2Former(ARCH, **kwargs)).train()
    triton_model = Conv2Former(ARCH, depthwise_impl='triton', **kwargs).train()
    triton_model.load_state_dict(torch_model.state_dict())
    return torch_model, triton_model


def _grads(model, x, call=None):
    model.zero_grad(set_to_none=True)
    sum(o.square().mean() for o in (model if call is None else call)(x)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('recompute', [True, False])
def test_backbone_gradients_match_pytorchs(recompute):
    torch_model, triton_model = _pair(recompute=recompute)
    x = torch.randn(2, 3, 32, 32)
    expected, got = _grads(torch_model, x), _grads(triton_model, x)
    assert expected.keys() == got.keys()
    for name, g in expected.items():
        assert relative_error(got[name], g) < 1e-4, name


def test_selective_checkpointing_stores_the_operators_large_kernel_output(monkeypatch):
    """recompute=True keeps the 5x5 operator's output like cuDNN's: the
    kernel runs as often as with recompute=False (forward and input gradient
    per block), not once more for recomputation."""
    calls = []
    forward = dw.forward_nhwc

    def counting(x, weight, bias=None, config=dw.FORWARD_CONFIG, out=None):
        calls.append(weight.shape[-1])
        return forward(x, weight, bias, config, out)
    monkeypatch.setattr(dw, 'forward_nhwc', counting)
    counts = {}
    for recompute in (False, True):
        calls.clear()
        _grads(_pair(recompute=recompute)[1], torch.randn(1, 3, 32, 32))
        counts[recompute] = (calls.count(5), calls.count(3))
    blocks = sum(ARCH['depths'])
    assert counts[False][0] == counts[True][0] == 2 * blocks
    assert counts[True][1] == counts[False][1] + blocks  # the 3x3 one is recomputed, as with PyTorch's


def test_compiled_backbone_matches_eager():
    """torch.compile sees an opaque operator with a shape function (aot_eager:
    graph capture and the recompute partition without code generation)."""
    torch_model, triton_model = _pair(recompute=True)
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(triton_model, backend='aot_eager', dynamic=False)
    expected, got = _grads(torch_model, x), _grads(triton_model, x, compiled)
    for name, g in expected.items():
        assert relative_error(got[name], g) < 1e-4, name
