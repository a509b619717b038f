"""``Conv2Former(depthwise_impl='triton')``: the arguments, PyTorch's
fallback where the kernels do not run, the checkpointing policy, and the
kernels themselves under Triton's interpreter (in a child process, see
``tests/interpreted_triton_depthwise.py``)."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.utils.checkpoint as cp
from conftest import ROOT, TINY, randomise

from mmconv2former.models import Conv2Former, ConvNHWC
from mmconv2former.models.conv2former import _keep_outputs
from mmconv2former.ops import depthwise_conv as dw


def test_unknown_impl_and_uncovered_convolutions_are_refused():
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        Conv2Former(TINY, depthwise_impl='cuda')
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        ConvNHWC(8, 8, 3, padding=1, groups=8, depthwise_impl='cudnn')
    for kwargs in (dict(stride=2, padding=1, groups=8), dict(padding=0, groups=8), dict(padding=1, groups=1)):
        with pytest.raises(ValueError, match='covers depthwise convolutions'):
            ConvNHWC(8, 8, 3, depthwise_impl='triton', **kwargs)


def test_only_the_blocks_depthwise_convolutions_switch():
    model = Conv2Former(TINY, depthwise_impl='triton')
    switched = {n for n, m in model.named_modules() if getattr(m, 'depthwise_impl', None) == 'triton'
                and isinstance(m, ConvNHWC)}
    blocks = [f'stages.{s}.{b}' for s, d in enumerate(TINY['depths']) for b in range(d)]
    assert switched == {f'{b}.attn.att.2' for b in blocks} | {f'{b}.mlp.pos' for b in blocks}
    assert "depthwise_impl='triton'" in repr(model.stages[0][0].mlp.pos)


def test_a_missing_triton_is_logged_not_fatal(monkeypatch):
    import mmconv2former.models.conv2former as c2f
    logged = []
    monkeypatch.setattr(c2f, 'TRITON_AVAILABLE', False)
    monkeypatch.setattr(c2f, 'print_log', lambda msg, **kwargs: logged.append(msg))
    model = Conv2Former(TINY, depthwise_impl='triton')
    assert len(logged) == 1 and "PyTorch's convolution serves instead" in logged[0]
    assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 16, 8, 8)


@pytest.mark.skipif(dw.INTERPRETED, reason='the interpreter runs the kernels on CPU tensors')
def test_cpu_tensors_fall_back_to_pytorch_exactly():
    """Where the kernels do not run (a CPU without the interpreter), the
    model computes what depthwise_impl='torch' computes, to the bit."""
    plain = randomise(Conv2Former(TINY)).train()
    switched = Conv2Former(TINY, depthwise_impl='triton').train()
    switched.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(plain(x), switched(x)):
        assert torch.equal(a, b)
    sum(o.sum() for o in plain(x)).backward()
    sum(o.sum() for o in switched(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), switched.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name


@pytest.mark.skipif(dw.DEPTHWISE_OP is None, reason='needs Triton and torch >= 2.4')
def test_checkpoint_policy_stores_the_operators_large_kernel_output():
    x = torch.empty(1, 8, 8, 16)
    for modulation_products in (True, False):  # recompute=True and recompute='modulation'
        assert _keep_outputs(modulation_products, None, dw.DEPTHWISE_OP, x, torch.empty(16, 1, 11, 11), None) \
            == cp.CheckpointPolicy.MUST_SAVE
        assert _keep_outputs(modulation_products, None, dw.DEPTHWISE_OP, x, torch.empty(16, 1, 3, 3), None) \
            == cp.CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.skipif(not dw.AVAILABLE, reason='needs Triton and torch >= 2.4')
def test_kernels_under_the_interpreter(triton_interpreter):
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_WAIT_POLICY='PASSIVE')
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           'interpreted_triton_depthwise.py'], cwd=osp.join(ROOT, 'tests'), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert '14 passed' in done.stdout and 'skipped' not in done.stdout
