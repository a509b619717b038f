"""The paths that GPU training takes (autocast, GradScaler, torch.compile,
the recompute policies under both), run here on a CPU, and
``tools/analysis/gpu_benchmark.py`` end to end at tiny shapes. Tests that need
CUDA skip cleanly without it."""
import json
import math
import os.path as osp
import runpy

import pytest
import torch
from conftest import ROOT, TINY, needs_convnext, randomise, relative_error

from mmconv2former.engine.profiling import TrainStep, build_conv2former, gradients, peak_memory
from mmconv2former.models import Conv2Former
from mmconv2former.ops import depthwise_conv as dw

GPU_BENCHMARK = osp.join(ROOT, 'tools', 'analysis', 'gpu_benchmark.py')
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(scope='module')
def tool():
    """The tool's functions (it is a script, not a module of the package)."""
    return runpy.run_path(GPU_BENCHMARK)


# ---------------------------------------------------------------------------- CPU
@pytest.mark.parametrize('kwargs', [dict(recompute=True), dict(recompute='modulation'), dict(with_cp=True)])
def test_recompute_policies_give_store_all_gradients_under_bf16_autocast(kwargs):
    """bf16 autocast exists on CPU: the policies recompute under the autocast
    state of the forward pass, so the gradients are the same numbers."""
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    plain = randomise(Conv2Former(TINY, recompute=False)).train()
    other = Conv2Former(TINY, **kwargs).train()
    other.load_state_dict(plain.state_dict())
    expected, got = gradients(plain, x, 'bf16'), gradients(other, x, 'bf16')
    assert expected.keys() == got.keys() == dict(plain.named_parameters()).keys()  # every one has a gradient
    for name, g in expected.items():
        assert relative_error(got[name], g) <= 1e-6, name


def test_fp16_training_with_a_grad_scaler_stays_finite():
    model = build_conv2former(TINY)
    step = TrainStep(model, torch.randn(2, 3, 64, 64), 'fp16', lr=1e-3)
    before = model.stages[2][0].mlp.fc1.weight.detach().clone()
    initial_scale = step.scaler.get_scale()
    losses = [step().item() for _ in range(3)]
    assert step.scaler.get_scale() == initial_scale  # no gradient overflowed, so no update was skipped
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before, model.stages[2][0].mlp.fc1.weight)  # the updates were applied


@pytest.mark.parametrize('recompute', [True, 'modulation'])
def test_compiled_training_step_matches_eager_under_autocast(recompute):
    """torch.compile captures the whole backbone, selective checkpointing
    included (either policy), as one graph, and the compiled model's
    gradients equal the eager model's (aot_eager: the graph capture and the
    recompute partition, without generating C++, which the slow inductor
    test below does)."""
    torch.compiler.reset()
    x = torch.randn(2, 3, 64, 64)
    arch = dict(TINY, depths=[1, 1, 1, 1])
    eager = randomise(Conv2Former(arch, recompute=recompute)).train()
    compiled_model = Conv2Former(arch, recompute=recompute).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend='aot_eager', dynamic=False, fullgraph=True)
    expected = gradients(eager, x, 'bf16')
    got = gradients(compiled_model, x, 'bf16', call=compiled)
    for name, g in expected.items():
        assert relative_error(got[name], g) <= 1e-2, name


@pytest.mark.slow
def test_inductor_compiled_training_step_matches_eager():
    """The default backend, generating and compiling C++ (a minute or more)."""
    x = torch.randn(1, 3, 32, 32)
    arch = dict(channels=[8, 8, 8, 8], depths=[1, 1, 1, 1], kernel_size=5)
    eager = randomise(Conv2Former(arch)).train()
    compiled_model = Conv2Former(arch).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, dynamic=False)
    expected = gradients(eager, x, 'bf16')
    got = gradients(compiled_model, x, 'bf16', call=compiled)
    assert got.keys() == expected.keys()
    # bf16 rounding differs between fused and eager kernels: a bias gradient of
    # 8 values can move by 2 %, so the bound is on all gradients together.
    assert relative_error(torch.cat([g.flatten() for g in got.values()]),
                          torch.cat([g.flatten() for g in expected.values()])) <= 1e-2


def test_settings_run_eager_first_and_quick_compiles_less(tool):
    full = tool['settings'](tiny=False, quick=False, with_compile=True)
    assert [s.compiled for s in full] == [False] * 6 + [True] * 6
    assert [str(s) for s in full[:3]] == ['train bf16, batch 64 at 224x224, eager',
                                          'train fp16, batch 64 at 224x224, eager',
                                          'inference bf16, batch 64 at 224x224, eager']
    assert {(s.mode, s.batch, s.side) for s in full} == {('train', 64, 224), ('train', 4, 1024),
                                                         ('inference', 64, 224), ('inference', 1, 1024)}
    # Compiled settings, which the time guard may cut, in the order the targets need them.
    assert [str(s) for s in full[6:]] == [
        'train bf16, batch 64 at 224x224, compiled', 'train bf16, batch 4 at 1024x1024, compiled',
        'inference bf16, batch 64 at 224x224, compiled', 'inference bf16, batch 1 at 1024x1024, compiled',
        'train fp16, batch 64 at 224x224, compiled', 'train fp16, batch 4 at 1024x1024, compiled']
    quick = tool['settings'](tiny=False, quick=True, with_compile=True)
    assert [str(s) for s in quick if s.compiled] == ['train bf16, batch 64 at 224x224, compiled',
                                                     'inference bf16, batch 64 at 224x224, compiled']
    assert not any(s.compiled for s in tool['settings'](tiny=True, quick=False, with_compile=False))


def test_gpu_benchmark_runs_every_path_on_cpu(tool, tmp_path, capsys):
    """``--device cpu --tiny``: the whole script at tiny shapes; every
    correctness check passes, every setting gives a row per model."""
    needs_convnext()
    path = str(tmp_path / 'gpu.json')
    result = tool['main'](['--device', 'cpu', '--tiny', '--json', path])
    out = capsys.readouterr().out
    assert [c['check'] for c in result['correctness'] if not c['passed']] == []
    assert len(result["correctness"]) == 14 and not result['skipped']
    settings = tool['settings'](tiny=True, quick=False, with_compile=True)
    assert len(result['rows']) == sum(4 if s.mode == 'train' else 3 for s in settings)
    for row in result['rows']:
        assert row['img_per_s'] > 0 and row['peak_mib'] is None and row['repeats'] == 3  # memory: CUDA
    assert [r['name'] for r in result['rows'][:2]] == ['Conv2Former-custom', 'Conv2Former-custom recompute-off']
    assert result['rows'][2]['name'] == 'Conv2Former-custom recompute-modulation'
    assert result['rows'][3]['name'] == result['convnext'] and result['convnext'] in out
    assert 'compiled' in out and '[FAILED]' not in out
    assert json.load(open(path))['settings']['backend'] == 'aot_eager'
    # Where the time goes: a profiled step of each model in each profiled setting.
    profiled = tool['breakdown_settings'](tiny=True)
    assert [b['setting'] for b in result['breakdowns']] == [str(s) for s in profiled]
    for breakdown in result['breakdowns']:
        assert [m['name'] for m in breakdown['models']][-1] == result['convnext']
        for model in breakdown['models']:
            assert model['total_ms'] > 0 and model['kinds'] and model['kernels']
    train = result['breakdowns'][0]['models']
    assert any(k.endswith('recomputed') for k in train[0]['kinds'])  # recompute=True, the default
    assert not any(k.endswith('recomputed') for k in train[1]['kinds'])  # recompute-off
    assert '## train bf16, batch 2 at 64x64, eager: [1] Conv2Former-custom' in out


def test_triton_variant_joins_the_eager_settings_and_the_gradient_checks(tool):
    """Where the Triton depthwise operator runs (CUDA, or the interpreter),
    Conv2Former-T with it is timed in eager settings and its gradients are
    checked; here its fallback (PyTorch's convolution) runs the same code."""
    needs_convnext()
    arch, peer = tool['TINY_ARCH'], {k: tool['TINY_ARCH'][k] for k in ('channels', 'depths')}
    Setting = tool['Setting']
    built = {}
    for compiled, expected in ((False, ['conv2former', 'recompute-off', 'recompute-modulation', 'triton-depthwise',
                                        'convnext']),
                               (True, ['conv2former', 'recompute-off', 'recompute-modulation', 'convnext'])):
        models = tool['models_for'](Setting('train', 'bf16', 2, 64, compiled), arch, peer, 'auto', triton=True)
        assert [key for key, _, _ in models] == expected
        built[compiled] = {key: model for key, _, model in models}
    assert built[False]['triton-depthwise'].depthwise_impl == 'triton'
    x = torch.randn(1, 3, 32, 32)
    checks = [c for c in tool['check_gradients'](arch, x, triton=True) if 'triton' in c['check']]
    assert len(checks) == 3 and all(c['passed'] and 'floored' in c['check'] for c in checks)


class Broken(torch.nn.Module):
    """A model whose every call raises, as a kernel that does not compile on
    a new GPU, or an out-of-memory error, would."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        raise RuntimeError('planted failure')


def test_a_failing_model_costs_only_its_own_rows(tool, tmp_path, capsys, monkeypatch):
    """A model that raises (in its profiled step and in every timed setting)
    is reported as failed, the other models' rows stand, the results file
    says so, and the run ends with a failure status."""
    needs_convnext()
    models_for = tool['models_for']

    def with_broken(*args, **kwargs):
        models = models_for(*args, **kwargs)
        return models[:-1] + [('broken', 'Broken', Broken())] + models[-1:]

    monkeypatch.setitem(tool['main'].__globals__, 'models_for', with_broken)
    path = str(tmp_path / 'gpu.json')
    result = tool['main'](['--device', 'cpu', '--tiny', '--no-compile', '--json', path])
    out = capsys.readouterr().out
    settings = tool['settings'](tiny=True, quick=False, with_compile=False)
    assert len(result['rows']) == sum(4 if s.mode == 'train' else 3 for s in settings) and not result['skipped']
    assert all(r['speed_vs_convnext'] > 0 for r in result['rows'])  # the ConvNeXt still the base
    low_high = [r['speed_vs_convnext_range'] for r in result['rows']]  # the spread of the paired ratios
    assert all(lo <= r['speed_vs_convnext'] <= hi for r, (lo, hi) in zip(result['rows'], low_high))
    assert [f['setting'] for f in result['failed_models']] == [str(s) for s in settings]
    assert all(f['error'] == 'RuntimeError: planted failure' and 'Traceback' in f['traceback']
               for f in result['failed_models'])
    for breakdown in result['breakdowns']:  # profiled: the others profiled, the broken one reported
        names = [m['name'] for m in breakdown['models'] if 'error' not in m]
        assert 'Broken' not in names and names[-1] == result['convnext']
    assert len(result['failed']) == len(settings) + len(result['breakdowns'])
    assert f'{"Broken":<40} failed: RuntimeError: planted failure' in out
    assert json.load(open(path))['failed'] == result['failed']
    assert [c['check'] for c in result['correctness'] if not c['passed']] == []


def test_profiles_stop_between_models_when_their_time_is_up(tool, monkeypatch, capsys):
    """The profiles' share of the budget is checked before each model, not
    only before each setting: a setting holds up to five models. Each
    profiled step here takes 10 s of a fake clock, against a 15 s limit."""
    needs_convnext()
    clock = {'now': 0.0}

    def profiled(step, device):
        clock['now'] += 10.0
        return dict(device_time=False, total_ms=1.0, kinds={'other, forward': 1.0}, kernels=[])

    globs = tool['run_breakdowns'].__globals__
    monkeypatch.setitem(globs, 'time', type('Clock', (), {'perf_counter': staticmethod(lambda: clock['now'])}))
    monkeypatch.setitem(globs, 'step_breakdown', profiled)
    args = tool['parse_args'](['--device', 'cpu', '--tiny', '--no-triton'])
    first, second = tool['run_breakdowns'](args, 15.0)
    models = first['models']
    assert [m['key'] for m in models if 'total_ms' in m] == ['conv2former', 'recompute-off']
    assert [m['key'] for m in models if 'skipped' in m] == ['recompute-modulation', 'convnext']
    assert second == dict(setting=second['setting'], skipped='over the 15 s given to profiles')
    tool['print_breakdown'](first)
    out = capsys.readouterr().out
    assert 'recompute-modulation not profiled, over the 15 s given to profiles' in out
    assert '[1] Conv2Former-custom  [2] Conv2Former-custom recompute-off\n' in out


def test_without_the_convnext_the_rows_stand_without_ratios(tool, monkeypatch, capsys):
    needs_convnext()
    models_for = tool['models_for']

    def broken_convnext(*args, **kwargs):
        return [m if m[0] != 'convnext' else ('convnext', m[1], Broken()) for m in models_for(*args, **kwargs)]

    monkeypatch.setitem(tool['main'].__globals__, 'models_for', broken_convnext)
    result = tool['main'](['--device', 'cpu', '--tiny', '--no-compile', '--no-profile'])
    settings = tool['settings'](tiny=True, quick=False, with_compile=False)
    assert len(result['rows']) == sum(3 if s.mode == 'train' else 2 for s in settings)
    assert len(result['failed_models']) == len(settings)
    assert all(r['speed_vs_convnext'] is None and r['memory_vs_convnext'] is None
               and r['speed_vs_convnext_range'] is None for r in result['rows'])
    assert 'Conv2Former-custom recompute-off' in capsys.readouterr().out


def test_a_gpu_that_stops_answering_ends_the_run_with_what_it_has(tool, tmp_path, monkeypatch, capsys):
    """After a failure, a GPU that no longer answers (CUDA errors are
    sticky) ends the run: the results so far are saved, the loss is the
    last failure listed, and nothing after it is attempted."""
    needs_convnext()
    models_for, DeviceLost = tool['models_for'], tool['DeviceLost']

    def with_broken(*args, **kwargs):
        models = models_for(*args, **kwargs)
        return models[:-1] + [('broken', 'Broken', Broken())] + models[-1:]

    def lost(device):
        raise DeviceLost('RuntimeError: planted loss')

    monkeypatch.setitem(tool['main'].__globals__, 'models_for', with_broken)
    monkeypatch.setitem(tool['main'].__globals__, 'release', lost)
    path = str(tmp_path / 'gpu.json')
    result = tool['main'](['--device', 'cpu', '--tiny', '--no-compile', '--no-profile', '--json', path])
    assert result['device_lost'] == 'RuntimeError: planted loss' and not result['rows']
    # The failure that came just before is stored, with its error.
    assert [(f['name'], f['error']) for f in result['failed_models']] == [('Broken', 'RuntimeError: planted failure')]
    assert result['failed'][-1] == 'GPU lost: RuntimeError: planted loss'
    assert all(c['passed'] for c in result['correctness'])  # what came before stands
    assert json.load(open(path))['device_lost'] == result['device_lost']
    assert 'the GPU stopped answering' in capsys.readouterr().out


def test_a_failing_check_is_reported_and_the_rest_runs(tool, monkeypatch, capsys):
    """A check that raises becomes a failed check with its error; the
    checks after it and the timings still run."""
    needs_convnext()

    def raising(*args, **kwargs):
        raise RuntimeError('planted failure')

    monkeypatch.setitem(tool['main'].__globals__, 'check_layouts', raising)
    result = tool['main'](['--device', 'cpu', '--tiny', '--no-compile', '--no-profile'])
    failed = [c for c in result['correctness'] if not c['passed']]
    assert [(c['check'], c['error']) for c in failed] == [('layouts', 'RuntimeError: planted failure')]
    assert any(c['check'].startswith('fp16 + GradScaler') and c['passed'] for c in result['correctness'])
    assert result['rows'] and result['failed'] == ['layouts']
    assert '[FAILED] layouts: raised RuntimeError: planted failure' in capsys.readouterr().out


@pytest.mark.skipif(dw.DEPTHWISE_OP is None or dw.INTERPRETED, reason='needs Triton, not its interpreter')
def test_a_triton_variant_that_raises_is_left_out_of_the_timings(tool, monkeypatch, capsys):
    """Told that its kernels run here, the Triton variant launches them on
    CPU tensors without the interpreter, which raises: its gradient checks
    fail with that error, and the timings go on without it."""
    needs_convnext()
    monkeypatch.setattr(dw, 'runs_here', lambda x: True)
    result = tool['main'](['--device', 'cpu', '--tiny', '--no-compile', '--no-profile'])
    triton = [c for c in result['correctness'] if 'triton' in c['check']]
    assert len(triton) == 3 and all(not c['passed'] and c['error'] for c in triton)
    assert all(c['passed'] for c in result['correctness'] if 'triton' not in c['check'])
    assert result['triton']['included'] is False and result['rows']
    assert not any('triton' in r['name'] for r in result['rows'])
    assert "raised in the checks: left out of the timings" in capsys.readouterr().out


def test_a_compiled_setting_short_of_time_times_what_it_compiled(tool):
    """Conv2Former and the ConvNeXt compile first; a model the time guard
    has no room for is named in the note, and the others are timed."""
    needs_convnext()

    class CompilesLeft:
        def __init__(self, compiles):
            self.compile_s, self.step_s, self.compiles = {}, {}, compiles

        def estimate(self, setting, cases, steps):
            return 0.0

        def left(self):
            return 100.0

        def compile_estimate(self, mode):
            self.compiles -= 1
            return 0.0 if self.compiles >= 0 else 1e9

    args = tool['parse_args'](['--device', 'cpu', '--tiny'])
    setting = tool['Setting']('train', 'bf16', 2, 64, True)
    try:
        rows, note, failed = tool['run_setting'](setting, args, CompilesLeft(2))
        assert [r['key'] for r in rows] == ['conv2former', 'convnext'] and not failed
        assert note == 'no time to compile Conv2Former-custom recompute-off, Conv2Former-custom recompute-modulation'
        assert rows[-1]['speed_vs_convnext'] == 1.0
        torch.compiler.reset()
        rows, note, _ = tool['run_setting'](setting, args, CompilesLeft(3))  # in the table's order again
        assert [r['key'] for r in rows] == ['conv2former', 'recompute-off', 'convnext']
        assert note == 'no time to compile Conv2Former-custom recompute-modulation'
    finally:
        torch.compiler.reset()


def test_time_guard_skips_what_does_not_fit(tool, capsys):
    """With no time left, every setting is skipped with a note (the
    correctness block still runs: it comes first and is cheap)."""
    needs_convnext()
    result = tool['main'](['--device', 'cpu', '--tiny', '--budget', '0', '--no-compile', '--no-profile'])
    assert not result['rows'] and len(result['skipped']) == 3 and not result['breakdowns']
    assert all(s['note'].startswith('skipped') for s in result['skipped'])
    assert 'skipped: needs about' in capsys.readouterr().out


def test_cuda_is_refused_without_a_gpu(tool, capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    with pytest.raises(SystemExit):
        tool['main']([])
    assert '--device cpu' in capsys.readouterr().err


# ---------------------------------------------------------------------------- CUDA
@requires_cuda
def test_cuda_peak_memory_counts_what_is_live_at_once():
    # max_memory_allocated counts the caching allocator's blocks, not the
    # bytes asked for: a request of 10 MiB or more gets a segment rounded up
    # to 2 MiB, and the part left over stays in the block when under 1 MiB.
    # Sizes of whole 2 MiB multiples, each 10 MiB or more, make the expected
    # peak exact: b and c live at once (36 MiB), c cannot reuse a's freed
    # 12 MiB, and a + b (28 MiB) is less.
    mib = 2 ** 20 // 4  # float32 elements in one MiB
    existing = torch.ones(16 * mib, device='cuda')

    def step():
        a = torch.ones(12 * mib, device='cuda')
        b = torch.ones(16 * mib, device='cuda')
        del a
        c = torch.ones(20 * mib, device='cuda')
        return b.sum() + c.sum() + existing[0]

    assert abs(peak_memory(step, 'cuda') - 36 * 2 ** 20) <= 2 ** 16  # the scalars: 512-byte blocks


@requires_cuda
def test_cuda_correctness_block_passes(tool):
    """Gradients of every policy under fp32/bf16/fp16 autocast, layouts, and
    fp16 steps with a GradScaler, on the GPU."""
    checks = tool['correctness'](dict(TINY), 2, 64, 'cuda')
    assert [c['check'] for c in checks if not c['passed']] == []


@requires_cuda
@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])  # fp16 first: the benchmark compiles it last, if at all
def test_cuda_compiled_training_step(dtype):
    x = torch.randn(2, 3, 64, 64, device='cuda').contiguous(memory_format=torch.channels_last)
    model = Conv2Former(dict(TINY, depths=[1, 1, 1, 1])).cuda().to(memory_format=torch.channels_last)
    step = TrainStep(torch.compile(model, dynamic=False), x, dtype)
    assert all(math.isfinite(step().item()) for _ in range(3))
