"""``tools/dev/depthwise_conv_probe.py``: the Triton candidate for the
depthwise convolutions, checked here on a CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set in a child process: the interpreter is chosen
when the kernels are defined), and the probe's timing code at tiny shapes."""
import json
import os
import os.path as osp
import runpy
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip('triton')
PROBE = osp.join(ROOT, 'tools', 'dev', 'depthwise_conv_probe.py')


def run_python(args, interpret: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    env.pop('TRITON_INTERPRET', None)
    if interpret:
        env['TRITON_INTERPRET'] = '1'
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600, **kwargs)


def test_triton_kernels_match_fp64_under_the_interpreter(tmp_path, triton_interpreter):
    """Forward (one output row per program, and several), input gradient (the
    flipped-kernel trick) and weight gradient (split over rows, atomically
    summed), fp32 and bf16 data, heights, widths and channel counts that are
    not multiples of the blocks."""
    path = str(tmp_path / 'checks.json')
    done = run_python([PROBE, '--device', 'cpu', '--json', path])
    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.load(open(path))['checks']
    # 2 shapes x (bf16, the timed dtype: forward and input grad in two block shapes, one of several
    # rows, and weight grad; fp32: the package's block shapes only)
    assert len(checks) == 2 * (5 + 3) and all(c['passed'] for c in checks)
    assert {tuple(c['config'])[0] for c in checks if c['direction'] == 'forward'} == {1, 4}
    probe = runpy.run_path(PROBE)
    assert {tuple(c['config']) for c in checks if c['dtype'] == 'torch.float32'} \
        == {tuple(probe['FORWARD_CONFIGS'][0]), tuple(probe['WGRAD_CONFIGS'][0])}
    assert {c['direction'] for c in checks} == {'forward', 'input grad', 'weight grad'}
    assert max(c['error'] for c in checks if c['dtype'] == 'torch.float32') < 1e-6
    assert '[FAILED]' not in done.stdout


def test_the_check_tells_a_wrong_gradient_from_a_right_one():
    """The input gradient through the kernel *unflipped* (a plausible bug)
    is far off the fp64 reference, so the check above can fail."""
    code = f"""
import runpy, torch
probe = runpy.run_path({PROBE!r})
x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
w, dy = torch.randn(16, 1, 3, 3), torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
want = probe['reference'](x, w, dy)['input grad']
right = probe['relative_error'](probe['triton_input_grad'](dy, w), want)
wrong = probe['relative_error'](probe['triton_forward'](dy, w), want)
print(right, wrong)
"""
    done = run_python(['-c', code])
    assert done.returncode == 0, done.stderr
    right, wrong = map(float, done.stdout.split())
    assert right < 1e-6 and wrong > 0.1


def test_every_kernel_variant_compiles_for_hopper_without_spilling(tmp_path):
    """What the interpreter cannot show: the kernels go through Triton's real
    compiler down to sm_90 machine code (H100/H200), every block shape the
    probe times, and none spills registers to local memory."""
    import triton
    if not osp.exists(osp.join(osp.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')):
        pytest.skip("this Triton ships no CUDA tools (ptxas, cuobjdump)")
    path = str(tmp_path / 'resources.json')
    done = run_python([PROBE, '--resources', '--json', path], interpret=False)
    assert done.returncode == 0, done.stdout + done.stderr
    kernels = json.load(open(path))['kernels']
    probe = runpy.run_path(PROBE)
    # K = 3, 7, 11; each for C divisible by 16 and for C = 72
    assert len(kernels) == 2 * 3 * (len(probe['FORWARD_CONFIGS']) + len(probe['WGRAD_CONFIGS']))
    assert {(k['K'], k['c_div']) for k in kernels} == {(k, c_div) for k in (3, 7, 11) for c_div in (16, 8)}
    assert all(0 < k['registers'] <= 255 and k['local_bytes'] == 0 for k in kernels)
    # Channels load as vectors (bf16: 4 or 8 at once), also at 72 channels, where only the
    # kernels' C_DIV tells Triton that each pixel's channels start on a vector boundary.
    assert all(k['widest_load_bytes'] >= 8 for k in kernels)


def test_the_check_fails_a_kernel_that_leaves_one_element_unwritten():
    """The checks hand the forward kernel an output filled with NaN: a kernel
    that writes every element but one, all of them right, fails; the same
    kernel writing all of them passes."""
    import torch
    import torch.nn.functional as F
    probe = runpy.run_path(PROBE)

    def planted(skip: int):
        def forward(x, weight, config, out):
            y = F.conv2d(x.float(), weight.float(), padding=weight.shape[-1] // 2, groups=weight.shape[0])
            out.view(-1)[skip:] = y.permute(0, 2, 3, 1).reshape(-1)[skip:].to(out.dtype)
            return out.permute(0, 3, 1, 2)
        return forward

    names = probe['check_triton'].__globals__
    names['WGRAD_CONFIGS'] = []  # the weight gradient is not under test
    results = {}
    for skip in (0, 1):
        names['triton_forward'] = planted(skip)
        names['triton_input_grad'] = lambda dy, weight, config, out, f=planted(skip): f(dy, weight.flip(-1, -2),
                                                                                     config, out)
        checks = list(probe['check_triton']('cpu', torch.float32, [(1, 8, 5, 6, 3)]))
        results[skip] = {c['passed'] for c in checks if c['direction'] != 'weight grad'}
    assert results == {0: {True}, 1: {False}}


def test_floors_are_the_larger_of_bytes_over_bandwidth_and_work_over_rate():
    probe = runpy.run_path(PROBE)
    ceilings = dict(copy_gbps=3350.0, fp32_tflops=67.0)
    rows = {(key, r['stage']): r for key, layer_rows in probe['layers'](False) for r in layer_rows}
    # 11x11 at 56x56: 242 flops per 4 bytes moved, over the 20 flops/byte these ceilings balance at.
    big = rows[('Conv2Former-T 11x11, batch 64 at 224x224', 1)]
    ms, bound = probe['floor_ms'](big, ceilings, 2)
    assert bound == 'arithmetic' and abs(ms - 2 * 121 * 64 * 72 * 56 * 56 / 67e12 * 1e3) < 1e-9
    # The MLP's 3x3 on 4C channels: 18 flops per 4 bytes, so the bytes set the floor.
    small = rows[('Conv2Former-T 3x3, batch 64 at 224x224', 1)]
    ms, bound = probe['floor_ms'](small, ceilings, 2)
    assert bound == 'memory' and abs(ms - 2 * (2 * 64 * 288 * 56 * 56 + 288 * 9) / 3350e9 * 1e3) < 1e-9
    totals = probe['predicted_floors'](ceilings)
    assert len(totals) == 6 and totals['Conv2Former-T 11x11, batch 64 at 224x224'] == pytest.approx(sum(
        3 * r['blocks'] * probe['floor_ms'](r, ceilings, 2)[0] for (key, _), r in rows.items()
        if key == 'Conv2Former-T 11x11, batch 64 at 224x224'))


def test_floors_print_without_a_gpu_and_refuse_bad_ceilings(tmp_path):
    path = str(tmp_path / 'floors.json')
    done = run_python([PROBE, '--floors', 'H200', '--json', path], interpret=False)
    assert done.returncode == 0, done.stderr
    result = json.load(open(path))
    assert result['ceilings'] == dict(copy_gbps=4800.0, fp32_tflops=67.0) and len(result['floor_totals']) == 6
    assert done.stdout.count('ms per training step') == 6
    for bad in ('3350', 'fast,67', '0,67'):
        done = run_python([PROBE, '--floors', bad], interpret=False)
        assert done.returncode == 2 and 'GB/s and TFLOP/s' in done.stderr


def test_cpu_needs_the_interpreter():
    done = run_python([PROBE, '--device', 'cpu'], interpret=False)
    assert done.returncode == 2 and 'TRITON_INTERPRET=1' in done.stderr


@pytest.mark.slow
def test_probe_times_every_implementation_at_tiny_shapes(tmp_path, triton_interpreter):
    path = str(tmp_path / 'probe.json')
    done = run_python([PROBE, '--device', 'cpu', '--tiny', '--json', path])
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.load(open(path))
    implementations = {'cuDNN, channels-last', 'PyTorch, NCHW', 'Triton, channels-last'}
    assert len(result['rows']) == 3 and all(set(r['times']) == implementations for r in result['rows'])
    for row in result['rows']:
        assert all(row['times'][impl][d] > 0 for impl in implementations
                   for d in ('forward', 'input grad', 'weight grad'))
        assert set(row['times']['Triton, channels-last']['configs']) == {'forward', 'input grad', 'weight grad'}
    assert set(result['totals']) == {'tiny 3x3, batch 1 at 36x36', 'tiny 5x5, batch 1 at 36x36'}
    # The ceilings are measured, each layer gets its floor and each model its floor sum.
    assert set(result['ceilings']) == {'copy_gbps', 'fp32_tflops', 'bf16_tflops'}
    assert all(v > 0 for v in result['ceilings'].values())
    assert all(r['floor_ms'] > 0 and r['bound'] in ('memory', 'arithmetic') for r in result['rows'])
    assert set(result['floor_totals']) == set(result['totals']) and 'x floor' in done.stdout


def test_a_kernel_that_raises_fails_its_check_and_is_not_timed(triton_interpreter):
    """A block shape Triton cannot build (a width that is not a power of
    two) fails its checks with the error instead of ending the probe; only
    the block shapes that passed every check are timed."""
    code = f"""
import json, runpy, torch
probe = runpy.run_path({PROBE!r})
probe['check_triton'].__globals__['FORWARD_CONFIGS'] = [(1, 16, 32, 4), (4, 12, 32, 4)]
checks = list(probe['check_triton']('cpu', torch.float32, [(1, 8, 5, 6, 3)]))
print(json.dumps(dict(checks=checks, good=probe['passing_configs'](checks))))
"""
    done = run_python(['-c', code])
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    bad = [c for c in result['checks'] if not c['passed']]
    assert {(c['direction'], tuple(c['config'])) for c in bad} == {('forward', (4, 12, 32, 4)),
                                                                   ('input grad', (4, 12, 32, 4))}
    assert all(c['raised'] and c['error'] is None for c in bad)
    assert result['good'] == {'forward': [[1, 16, 32, 4]], 'weight grad': [[8, 32, 4]]}


def test_only_block_shapes_that_passed_every_check_are_timed():
    probe = runpy.run_path(PROBE)
    default, other = probe['FORWARD_CONFIGS'][:2]
    checks = [dict(direction='forward', config=default, passed=True),
              dict(direction='input grad', config=default, passed=True),
              dict(direction='forward', config=other, passed=True),
              dict(direction='input grad', config=other, passed=False),
              dict(direction='weight grad', config=probe['WGRAD_CONFIGS'][0], passed=False)]
    assert probe['passing_configs'](checks) == {'forward': [tuple(default)], 'weight grad': []}


def raising_at_layer(probe: dict, n: int, exc: BaseException) -> list:
    """Make this (runpy-loaded) probe's layer timing raise ``exc`` at its
    ``n``-th layer; returns the list of the calls made."""
    time_layer, calls = probe['time_layer'], []

    def timing(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise exc
        return time_layer(*args, **kwargs)

    probe['probe'].__globals__['time_layer'] = timing
    return calls


def test_a_layer_that_raises_is_reported_and_the_sums_say_so(capsys):
    """A layer whose timing raises (say, out of memory) is a row with the
    error; the other layers are timed, and the per-model sum that misses it
    says it is incomplete."""
    import torch
    probe = runpy.run_path(PROBE)
    calls = raising_at_layer(probe, 1, RuntimeError('planted failure'))
    result = probe['probe']('cpu', torch.float32, budget=600, tiny=True, configs=None)
    raised = [r for r in result['rows'] if 'raised' in r]
    assert [r['raised'] for r in raised] == ['RuntimeError: planted failure']
    assert len(result['rows']) == len(calls) == 3 and all('times' in r for r in result['rows'] if r not in raised)
    out = capsys.readouterr().out
    assert 'raised RuntimeError: planted failure' in out and 'sums incomplete' in out
    assert result['incomplete'] == ['tiny 3x3, batch 1 at 36x36']


def test_a_direction_that_raises_leaves_the_other_directions_and_implementations_timed(capsys):
    """One implementation's direction that raises (say, cuDNN has no
    algorithm for it) is listed under that implementation with its error and
    printed at once; its other directions and the other implementations are
    timed, its per-model sum says it lacks a direction, and it counts as a
    failure."""
    import torch
    probe = runpy.run_path(PROBE)
    directions = probe['torch_directions']

    def planted(x, weight):
        fns = directions(x, weight)
        if x.is_contiguous():  # the NCHW layout only

            def fail(dy):
                raise RuntimeError('planted failure')
            fns['weight grad'] = fail
        return fns

    probe['time_layer'].__globals__['torch_directions'] = planted
    result = probe['probe']('cpu', torch.float32, budget=600, tiny=True, configs=None)
    assert len(result['rows']) == 3
    for row in result['rows']:
        nchw, cudnn = row['times']['PyTorch, NCHW'], row['times']['cuDNN, channels-last']
        assert nchw['raised'] == [dict(direction='weight grad', error='RuntimeError: planted failure')]
        assert nchw['forward'] > 0 and nchw['input grad'] > 0 and 'weight grad' not in nchw
        assert all(cudnn[d] > 0 for d in ('forward', 'input grad', 'weight grad')) and 'raised' not in cudnn
    assert all(t['PyTorch, NCHW'] is None and t['cuDNN, channels-last'] > 0 for t in result['totals'].values())
    assert probe['failures'](result) == 3 and not result['incomplete']
    out = capsys.readouterr().out
    assert out.count('! PyTorch, NCHW weight grad: raised RuntimeError: planted failure') == 3
    assert 'PyTorch, NCHW (not every direction)' in out


def test_layers_skipped_for_the_budget_leave_the_sums_marked_incomplete():
    import torch
    probe = runpy.run_path(PROBE)
    result = probe['probe']('cpu', torch.float32, budget=0, tiny=True, configs=None)
    assert result['rows'] and all('skipped' in r for r in result['rows'])
    assert result['incomplete'] == ['tiny 3x3, batch 1 at 36x36', 'tiny 5x5, batch 1 at 36x36']


def test_the_benchmark_times_triton_only_if_the_packages_block_shapes_passed():
    """gpu_session.sh runs the benchmark with --no-triton unless the block
    shapes the package uses passed every check and raised at no layer."""
    probe = runpy.run_path(PROBE)
    fwd, wgrad = tuple(probe['FORWARD_CONFIGS'][0]), tuple(probe['WGRAD_CONFIGS'][0])
    other = tuple(probe['FORWARD_CONFIGS'][1])

    def result(failing=(), rows=(), **extra):
        checks = [dict(direction=d, config=cf, passed=(d, cf) not in failing)
                  for cf in (fwd, other) for d in ('forward', 'input grad')]
        checks.append(dict(direction='weight grad', config=wgrad, passed=('weight grad', wgrad) not in failing))
        return dict(checks=checks, rows=list(rows), **extra)

    def triton_row(direction, config):
        raised = [dict(direction=direction, config=config, error='RuntimeError: x')]
        return dict(times={'Triton, channels-last': dict(raised=raised)})

    ok = probe['triton_default_ok']
    assert ok(result())
    assert ok(result(failing=[('input grad', other)], rows=[triton_row('forward', other)]))  # not the package's
    assert not ok(result(failing=[('input grad', fwd)]))
    assert not ok(result(failing=[('weight grad', wgrad)]))
    assert not ok(result(rows=[triton_row('input grad', fwd)]))
    assert not ok(result(rows=[triton_row('weight grad', wgrad)]))
    assert not ok(result(rows=[dict(raised='RuntimeError: out of memory')]))
    assert not ok(result(device_lost='RuntimeError: illegal memory access'))


def test_a_gpu_that_stops_answering_ends_the_timings_with_what_they_have(capsys):
    import torch
    probe = runpy.run_path(PROBE)
    calls = raising_at_layer(probe, 2, probe['DeviceLost']('RuntimeError: planted loss'))
    saved = []
    result = probe['probe']('cpu', torch.float32, budget=600, tiny=True, configs=None,
                            save=lambda: saved.append(1))
    assert result['device_lost'] == 'RuntimeError: planted loss' and len(calls) == 2
    assert 'times' in result['rows'][0] and saved  # the first layer was timed and saved
    assert result['incomplete'] == ['tiny 5x5, batch 1 at 36x36']  # the 3x3 model was finished
    assert 'the GPU stopped answering' in capsys.readouterr().out
