"""The backbone's fast paths compute what the release-style reference computes.

The speed work (fused GEMMs, layer scale folded into the projection, in-place
activations when autograd is off, CPU cache blocking, channels-last stem,
stem BatchNorm folding) must not change a number beyond float rounding:
fp32 outputs within 1e-4 of :class:`ReferenceConv2Former` on random weights,
layer scales included, and gradients equal to the reference's.
"""
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn as nn

from mmconv2former import Conv2Former
import mmconv2former.models.conv2former as conv2former_module
from mmconv2former.models.conv2former import Conv2FormerBlock
from mmconv2former.models.reference import ReferenceConv2Former
from test_conv2former import TINY, randomise

ATOL = 1e-4


def pair(arch=TINY, **kwargs):
    """A reference with random weights and our backbone holding the same weights."""
    ref = randomise(ReferenceConv2Former(**arch)).eval()
    ours = Conv2Former(arch, out_norm=False, **kwargs).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items()
                          if not k.startswith(('head.', 'pred.'))})
    return ours, ref


def assert_matches(outs, ref_outs):
    for ours, theirs in zip(outs, ref_outs):
        assert theirs.abs().max() > 0.1  # the comparison is not between zeros
        assert (ours - theirs).abs().max() <= ATOL


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'autograd'])
@pytest.mark.parametrize('chunk_pixels', [1, 10 ** 9], ids=['chunked', 'whole-batch'])
@pytest.mark.parametrize('fuse_linear_gelu', [False, True], ids=['gemm-then-gelu', 'fused-gemm-gelu'])
def test_inference_paths_match_reference(grad, chunk_pixels, fuse_linear_gelu, monkeypatch):
    """No-grad (in-place, cache-blocked) and autograd paths, in eval mode, with
    either fc1 path whichever CPU runs the test (each is the default on some)."""
    monkeypatch.setattr(conv2former_module, 'FUSE_LINEAR_GELU', fuse_linear_gelu)
    ours, ref = pair()
    ours.cpu_chunk_pixels = chunk_pixels  # 1: every image on its own, at every stage
    x = torch.randn(3, 3, 64, 64)
    x_before = x.clone()
    with torch.set_grad_enabled(grad):
        outs = ours(x)
    with torch.no_grad():
        assert_matches(outs, ref.forward_stages(x))
    assert torch.equal(x, x_before)  # in-place work never touches the caller's tensor
    with torch.inference_mode():
        assert_matches(ours(x), ref.forward_stages(x))


@pytest.mark.parametrize('onednn', [True, False], ids=['onednn', 'onednn-off'])
def test_pointwise_inference_paths_match_plain_linear(onednn):
    """A 1x1 conv at CPU inference: oneDNN's product with the bias in its
    epilogue, or (oneDNN off) the GEMM then an in-place bias; both equal
    ``F.linear`` on channels-last data, strided input included."""
    from mmconv2former.models.layers import pointwise
    x = torch.randn(2, 9, 7, 24).permute(0, 2, 1, 3)  # (B, H, W, C), not contiguous
    weight, bias = torch.randn(40, 24, 1, 1), torch.randn(40)
    expected = torch.nn.functional.linear(x, weight.flatten(1), bias)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=onednn):
        out = pointwise(x, weight, bias)
    assert bias.abs().max() > 0.1  # a dropped bias would show
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cpu_inference_without_onednn_matches_reference():
    """With oneDNN disabled (``torch.backends.mkldnn.flags(enabled=False)``),
    CPU inference falls back to ATen's kernels and still matches."""
    ours, ref = pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        outs = ours(x)
    with torch.no_grad():
        assert_matches(outs, ref.forward_stages(x))


def test_training_forward_and_gradients_match_reference():
    """The fused residual GEMM (layer scale folded into proj) under autograd."""
    ours, ref = pair()
    ours.train()  # stem BatchNorm on batch statistics, as the reference in train mode
    ref.train()
    x = torch.randn(2, 3, 64, 64)
    outs, ref_outs = ours(x), ref.forward_stages(x)
    assert_matches(outs, ref_outs)
    sum((o ** 2).mean() for o in outs).backward()
    sum((o ** 2).mean() for o in ref_outs).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected = ref_params[name].grad
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-3, msg=name)


def test_inference_weight_cache_follows_every_weight_change():
    """Derived weights (stacked att.0/v, layer scale folded into proj/fc2) are
    cached between no-grad calls; in-place updates (optimiser steps, EMA,
    load_state_dict) and dtype moves must never leave a stale copy."""
    ours, ref = pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours(x)  # fills the caches
        new_weights = randomise(ReferenceConv2Former(**TINY), seed=1).state_dict()
        ours.load_state_dict({k: v for k, v in new_weights.items()
                              if not k.startswith(('head.', 'pred.'))})
        ref.load_state_dict(new_weights)
        assert_matches(ours(x), ref.forward_stages(x))
    # an optimiser step on the cached parameters only
    cached = [p for n, p in ours.named_parameters()
              if n.endswith(('att.0.weight', 'v.bias', 'proj.weight', 'fc2.bias', 'layer_scale_1'))]
    for p in cached:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(cached, lr=0.1).step()
    ref.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():
        assert_matches(ours(x), ref.forward_stages(x))
        ours.double()
        outs = ours(x.double())
    assert all(o.dtype == torch.float64 for o in outs)
    with torch.no_grad():
        assert_matches([o.float() for o in outs], ref.forward_stages(x))
    with torch.inference_mode():  # weights made here have no version counter
        model = Conv2Former(TINY, out_norm=False).eval()
        model.load_state_dict(ours.float().state_dict())
        assert_matches(model(x), ref.forward_stages(x))


def test_standalone_block_leaves_its_input_alone_without_grad():
    """Only the backbone's own stage loop accumulates into its input."""
    block = random_block().eval()
    x = torch.randn(2, 8, 8, 16)
    x_before = x.clone()
    with torch.no_grad():
        first, second = block(x), block(x)
    assert torch.equal(x, x_before)
    assert torch.equal(first, second)


@pytest.mark.parametrize('chunk_pixels', [1, 10 ** 9], ids=['chunked', 'whole-batch'])
def test_autocast_inference_matches_reference(chunk_pixels):
    """Under autocast blocks are not in place: chunked stages are gathered."""
    ours, ref = pair()
    ours.cpu_chunk_pixels = chunk_pixels
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs = ours(x)
        for out, expected in zip(outs, ref.forward_stages(x)):
            assert out.shape == expected.shape
            assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_autocast_runs_products_in_half_precision_not_in_fused_fp32_kernels():
    """oneDNN's fused CPU kernels bypass autocast; under bf16 autocast every
    matrix product and convolution must go through autocast's bf16 casts."""
    from torch.profiler import ProfilerActivity, profile
    ours, _ = pair()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            ours(torch.randn(1, 3, 64, 64))
    events = prof.key_averages()
    assert not [e.key for e in events if e.key.startswith('mkldnn::')]
    linears = [e for e in events if e.key == 'aten::linear']
    assert linears and sum(e.count for e in linears) >= 2 * sum(ours.depths)  # att.0+v and fc1 per block


def test_block_keeps_an_fp32_residual_under_autocast():
    """Under autocast the residual add stays fp32 (the fused GEMM would round it)."""
    block = Conv2FormerBlock(16, 5).eval()
    x = torch.randn(2, 8, 8, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = block(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, block(x), atol=0.05, rtol=0.05)


def test_drop_path_training_path_is_unfused_and_random():
    torch.manual_seed(0)
    block = Conv2FormerBlock(16, 5, drop_path=0.5, layer_scale_init_value=1.0).train()
    x = torch.randn(8, 4, 4, 16)
    kept = [(block(x) - x).flatten(1).abs().sum(1) for _ in range(2)]
    assert not torch.equal(kept[0], kept[1])  # stochastic depth really drops samples


def random_block(drop_path: float = 0.0) -> Conv2FormerBlock:
    torch.manual_seed(0)
    block = Conv2FormerBlock(16, 5, drop_path=drop_path)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if 'layer_scale' in name or name.endswith('norm.weight'):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return block


def test_block_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph=True fails on any graph break; the no-grad path has the in-place ops."""
    torch._dynamo.reset()
    block = random_block(drop_path=0.1).eval()
    x = torch.randn(2, 8, 8, 16)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_block_compiles_for_training_and_matches_eager():
    torch._dynamo.reset()
    block = random_block().train()
    eager = random_block().train()
    x = torch.randn(2, 8, 8, 16)
    compiled = torch.compile(block, fullgraph=True)
    out, expected = compiled(x), eager(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(block.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fuse_stem_bn_is_exact_and_documented():
    ours, _ = pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ours(x)
        assert ours.fuse_stem_bn() is ours
        fused = ours(x)
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    stem = ours.downsample_layers[0]
    assert isinstance(stem[5], nn.Identity) and stem[6].bias is not None
    assert isinstance(stem[2], nn.BatchNorm2d)  # before a zero-padded conv: not foldable exactly
    ours.fuse_stem_bn()  # a second call is a no-op
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], fused[0])


def test_fuse_stem_bn_refuses_training_mode():
    with pytest.raises(RuntimeError, match='eval'):
        Conv2Former(TINY).train().fuse_stem_bn()


def test_benchmark_cpu_peak_memory_counts_what_is_live_at_once():
    """The benchmark's CPU peak (torch.profiler allocation events) on a known pattern."""
    path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools', 'analysis', 'benchmark.py')
    spec = importlib.util.spec_from_file_location('benchmark', path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    existing = torch.ones(4_000_000)  # live before the step: not counted

    def step():
        a = torch.ones(1_000_000)
        b = torch.ones(2_000_000)
        del a
        c = torch.ones(3_000_000)
        return b.sum() + c.sum() + existing[0]

    peak = benchmark.peak_memory(step, 'cpu')
    assert abs(peak - 5_000_000 * 4) <= 1024  # b and c together, a already freed


def test_tracers_and_flop_counters_see_plain_aten_ops():
    """The oneDNN-fused CPU kernels are for eager inference only: FLOP counting
    (dispatch mode) and JIT tracing (get_flops, ONNX) must see convolutions
    and matrix products, and count the same FLOPs as with autograd on."""
    from torch.utils.flop_counter import FlopCounterMode
    ours, ref = pair()
    x = torch.randn(1, 3, 64, 64)
    counts = []
    for grad in (True, False):
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(grad):
            ours(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    with torch.no_grad():
        traced = torch.jit.trace(ours, x, check_trace=False)
        assert_matches(traced(x), ref.forward_stages(x))
    assert 'mkldnn' not in str(traced.graph)
