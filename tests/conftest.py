import argparse
import os
import os.path as osp
import subprocess
import sys

# OpenMP threads that spin while waiting make 2-thread torch 5-20x slower as
# soon as another process shares the 2 cores (as CI and developers' test runs
# do); passive waiting costs nothing on an idle machine. Set before torch loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch.nn as nn  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import mmconv2former  # noqa: E402,F401  (registers the modules)

#: The one tiny architecture the tests build: every stage present, stage 1
#: and 2 with more than one block (layer-wise decay, stochastic depth), an odd
#: kernel larger than 3 (the large-kernel depthwise path), sides small enough
#: that a model builds and runs in milliseconds. Tests that need another shape
#: derive it (``dict(TINY, depths=[1, 1, 1, 1])``) where they use it.
TINY = dict(channels=[16, 32, 48, 64], depths=[1, 2, 3, 1], kernel_size=5)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, including layer scales and norms, so that
    every branch contributes to the output (the 1e-6 layer scale would hide
    a wrong block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'layer_scale' in name or name.endswith('norm.weight') or '.0.weight' in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def release_pair(arch: dict = TINY, **kwargs):
    """The release-style reference with random weights, and our backbone
    (without output norms, which the release lacks) holding the same weights."""
    from mmconv2former import Conv2Former
    from reference import ReferenceConv2Former
    ref = randomise(ReferenceConv2Former(**arch)).eval()
    ours = Conv2Former(arch, out_norm=False, **kwargs).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items()
                          if not k.startswith(('head.', 'pred.'))})
    return ours, ref


def assert_matches(outs, ref_outs, atol: float = 1e-4) -> None:
    """Feature maps equal within ``atol``, and not trivially (all near zero)."""
    for ours, theirs in zip(outs, ref_outs):
        assert theirs.abs().max() > 0.1  # the comparison is not between zeros
        assert (ours - theirs).abs().max() <= atol


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` in its current mode, counted by
    PyTorch's dispatch-level counter (what FLOP tools see)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(model.training):
        model(x)
    return counter.get_total_flops()


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """mmengine's default scope is process-global: a test (or the library
    code it calls) that creates one would otherwise decide which registry the
    next test's ``type=`` names resolve in. mmengine has no public way to drop
    an instance, so the instance table is restored as it was."""
    saved = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end runs (minutes); `-m "not slow"` skips them')


def write_release_checkpoint(path: str, state_dict: dict, ema_state_dict: dict = None,
                             **extra) -> str:
    """Write a file laid out like the authors' timm checkpoints.

    timm's CheckpointSaver stores epoch, arch, state_dict, optimizer, version,
    args (an argparse.Namespace), metric and, with EMA, state_dict_ema.
    """
    payload = {
        'epoch': 299,
        'arch': 'conv2former_n',
        'state_dict': {k: v.clone() for k, v in state_dict.items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-5, 'weight_decay': 0.05,
                                                      'params': [0, 1]}]},
        'version': 2,
        'args': argparse.Namespace(model='conv2former_n', lr=1e-3, batch_size=128,
                                   drop_path=0.1, model_ema=True, mixup=0.8),
        'metric': 81.5,
    }
    if ema_state_dict is not None:
        payload['state_dict_ema'] = {k: v.clone() for k, v in ema_state_dict.items()}
    payload.update(extra)
    torch.save(payload, path)
    return path


@pytest.fixture
def release_checkpoint(tmp_path):
    """Factory: ``release_checkpoint(state, ema_state=None, name=...)`` -> path."""
    def make(state, ema_state=None, name='conv2former.pth.tar', **extra):
        return write_release_checkpoint(str(tmp_path / name), state, ema_state, **extra)
    return make


def load_tool(path: str):
    """The script ``tools/<path>`` (``'model_converters/conv2former_to_mm.py'``)
    as a module: tools/ is a folder of scripts, not a package."""
    import importlib.util
    name = osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, 'tools', path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def coco_demo(tmp_path_factory) -> str:
    """A small COCO-format demo set (8 training, 4 validation images), written
    once per run; tests that damage files work on a copy."""
    from mmconv2former.demo.coco import generate_coco_demo
    return generate_coco_demo(str(tmp_path_factory.mktemp('coco_demo')), num_train=8, num_val=4, seed=3)


@pytest.fixture(scope='session')
def triton_interpreter() -> None:
    """Skip the test where Triton's interpreter cannot run the depthwise
    kernels here. Triton 3.6's interpreter turns a loop's runtime bound into
    an int with ``int()`` of a one-element array, which NumPy 2.4 made an
    error ("only 0-dimensional arrays can be converted to Python scalars"),
    so with NumPy >= 2.4 it fails on the weight-gradient kernel's loops;
    with NumPy 2.3 it runs them (all interpreted tests pass, torch 2.11,
    2026-12-05), as Triton 3.8's does with any NumPy. The compiled kernels on
    a GPU are not affected. Tried once, in a child process: the interpreter
    is chosen when the kernels are defined."""
    pytest.importorskip('triton')
    code = ('import torch\n'
            'from mmconv2former.ops import depthwise_conv as dw\n'
            'x = torch.randn(1, 3, 3, 2)\n'
            'dw.forward_nhwc(x, torch.randn(2, 1, 3, 3))\n'
            'dw.weight_grad_nhwc(x, x, 3)\n')
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_WAIT_POLICY='PASSIVE')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    # Only this known limitation skips: any other failure is the kernels' and
    # must show in the tests that use them.
    if done.returncode != 0 and 'only 0-dimensional arrays can be converted' in done.stderr:
        import triton
        import numpy
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops with runtime bounds under "
                    f'NumPy {numpy.__version__} (>= 2.4); NumPy < 2.4 or Triton >= 3.8 runs them')


def needs_convnext() -> None:
    """Skip the calling test where the ConvNeXt peer cannot be built (neither
    mmpretrain's nor timm's imports), as the benchmark tools would find."""
    from mmconv2former.engine.profiling import convnext_label
    try:
        convnext_label('t')
    except ImportError:
        pytest.skip('the ConvNeXt peer needs mmpretrain or timm')


def assert_shipped_config_is_swap_output(shipped_path: str, src: str, head: str, tmp_path) -> 'object':
    """One of our configs equals what ``swap_backbone(src, 't')`` writes, plus
    the pretrained weights' ``init_cfg``; returns the shipped config."""
    from mmengine.config import Config

    from mmconv2former.swap import swap_backbone
    shipped = Config.fromfile(osp.join(ROOT, shipped_path))
    swap_backbone(src, 't', str(tmp_path / 'swapped.py'))
    swapped = Config.fromfile(str(tmp_path / 'swapped.py'))
    backbone = dict(shipped.model.backbone)
    assert backbone.pop('init_cfg')['prefix'] == 'backbone.'
    assert backbone == dict(swapped.model.backbone)
    assert shipped.model[head] == swapped.model[head]
    assert shipped.model.data_preprocessor == swapped.model.data_preprocessor
    return shipped
