"""The measuring helpers (``mmconv2former.engine.profiling``) and
``tools/analysis/benchmark.py`` run as a user runs it."""
import json
import os.path as osp
import runpy
import statistics

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, TINY, needs_convnext

from mmconv2former.engine import profiling
from mmconv2former.engine.profiling import (Case, TrainStep, build_convnext, describe, machine,
                                            make_step, paired_ratio, peak_memory, summarise,
                                            time_interleaved)

BENCHMARK = osp.join(ROOT, 'tools', 'analysis', 'benchmark.py')
ARCH = json.dumps(TINY)


def benchmark_main(argv):
    return runpy.run_path(BENCHMARK)['main'](argv)


# ---------------------------------------------------------------------------- memory
def test_cpu_peak_memory_counts_what_is_live_at_once():
    """The CPU peak (torch.profiler allocation events) on a known pattern."""
    existing = torch.ones(4_000_000)  # live before the step: not counted

    def step():
        a = torch.ones(1_000_000)
        b = torch.ones(2_000_000)
        del a
        c = torch.ones(3_000_000)
        return b.sum() + c.sum() + existing[0]

    peak = peak_memory(step, 'cpu')
    assert abs(peak - 5_000_000 * 4) <= 1024  # b and c together, a already freed


def test_training_step_peak_excludes_weights_and_optimiser_state():
    """After a first step, a step's peak is its activations and gradients:
    for a 1x1 conv on a tiny input, the gradients, not the 4 times larger
    weights plus AdamW state."""
    model = nn.Conv2d(512, 512, 1)
    step = TrainStep(model, torch.randn(1, 512, 2, 2), loss_fn=lambda out: out.mean())
    step()  # creates the optimiser state
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert weights <= peak_memory(step, 'cpu') < 1.5 * weights
    assert step.optimizer.state  # the state exists and was live before the step


# ---------------------------------------------------------------------------- timing
def test_interleaved_timing_rotates_the_order_and_pairs_the_ratios(monkeypatch):
    """Each repeat times every case once, starting one case later each time;
    ratios are medians of per-repeat ratios, so a slowdown that hits one
    repeat (both cases alike) leaves them unchanged."""
    clock = [0.0]
    monkeypatch.setattr(profiling.time, 'perf_counter', lambda: clock[0])
    calls, slow = [], {'repeat': None}

    def stepper(name, seconds):
        def step():
            calls.append(name)
            factor = 10.0 if len(calls) > 3 and (len(calls) - 4) // 3 == slow['repeat'] else 1.0
            clock[0] += seconds * factor
        return step

    slow['repeat'] = 1  # everything in the second timed repeat runs 10x slower
    cases = [Case('a', stepper('a', 1.0), images=2), Case('b', stepper('b', 2.0), images=2),
             Case('c', stepper('c', 4.0), images=4)]
    time_interleaved(cases, repeats=3, warmup=1)
    assert calls == ['a', 'b', 'c'] + ['a', 'b', 'c', 'b', 'c', 'a', 'c', 'a', 'b']
    assert [len(c.samples) for c in cases] == [3, 3, 3]
    assert paired_ratio(cases[0], cases[1]) == dict(median=2.0, min=2.0, max=2.0)
    assert paired_ratio(cases[2], cases[0])['median'] == 0.5  # per image: 1 s against 0.5 s
    row = summarise(cases[0])
    assert row['img_per_s'] == 2.0 and row['min'] == pytest.approx(0.2) and row['repeats'] == 3
    assert row['ms_per_step'] == statistics.median([1e3, 1e4, 1e3])


def test_machine_names_the_processor_and_torch():
    info = machine()
    assert info['torch'] == torch.__version__ and info['threads'] == torch.get_num_threads()
    line = describe(info)
    assert info['cpu'] in line and ('no GPU' in line) != torch.cuda.is_available()


# ---------------------------------------------------------------------------- ConvNeXt peer
def test_convnext_peer_from_timm_says_so():
    pytest.importorskip('timm')
    model, label = build_convnext(dict(channels=[16, 32, 48, 64], depths=[1, 1, 1, 1]), library='timm')
    assert label == 'ConvNeXt-custom (timm)'
    outs = model(torch.randn(1, 3, 64, 64))
    assert isinstance(outs, tuple) and [o.shape[1] for o in outs] == [16, 32, 48, 64]


def test_convnext_peer_prefers_mmpretrain():
    pytest.importorskip('mmpretrain')
    model, label = build_convnext(dict(channels=[16, 32, 48, 64], depths=[1, 1, 1, 1]))
    assert label == 'ConvNeXt-custom (mmpretrain)'
    assert [o.shape[-1] for o in model(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 2]


def test_convnext_peer_rejects_unknown_sizes():
    with pytest.raises(ValueError, match='no ConvNeXt of matching size'):
        build_convnext('xl')
    with pytest.raises(ValueError, match='library'):
        build_convnext('t', library='torchvision')


def test_inference_step_keeps_no_graph_and_training_step_updates():
    model = nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 4, 4)
    make_step(model, x, training=False)()
    assert not model.training and model.weight.grad is None
    before = model.weight.detach().clone()
    loss = make_step(model, x, training=True, dtype='bf16', loss_fn=lambda out: out.float().mean())()
    assert model.training and not loss.requires_grad
    assert not torch.equal(before, model.weight) and model.weight.grad is None  # freed after the update


# ---------------------------------------------------------------------------- the tool
@pytest.mark.parametrize('mode', ['train', 'inference'])
def test_backbone_run_prints_ratios_and_memory(mode, capsys, tmp_path):
    needs_convnext()
    extra = ['--peers', 'convnext,recompute-off,with-cp'] if mode == 'train' else ['--switch-to-deploy']
    path = str(tmp_path / 'result.json')
    result = benchmark_main(['--device', 'cpu', '--arch', ARCH, '--mode', mode, '--batch', '1', '--input-size', '64',
                             '--memory', '--repeats', '2', '--warmup', '1', '--json', path, *extra])
    out = capsys.readouterr().out
    names = [r['name'] for r in result['rows']]
    expected = (['Conv2Former-custom', 'Conv2Former-custom recompute-off', 'Conv2Former-custom with-cp']
                if mode == 'train' else ['Conv2Former-custom', 'Conv2Former-custom switch_to_deploy()'])
    assert names[:-1] == expected
    base = names[-1]
    assert base.startswith('ConvNeXt-custom (')  # the ConvNeXt peer, naming its library
    for row in result['rows']:
        assert row['base'] == base and row['peak_mb'] > 0 and row['memory_vs_base'] > 0
        assert row['speed_vs_base']['min'] <= row['speed_vs_base']['median'] <= row['speed_vs_base']['max']
        assert row['name'] in out
    assert f'speed vs {base}' in out and 'peak MB' in out and 'x (' in out
    assert out.startswith('# ') and describe(result['machine']) in out  # names the machine
    assert json.load(open(path))['rows'][0]['name'] == names[0]


def test_sweep_reports_cost_per_pixel(capsys):
    result = benchmark_main(['--device', 'cpu', '--arch', ARCH, '--batch', '1', '--sweep', '64', '96', '--peers', 'none',
                             '--repeats', '1', '--warmup', '0'])
    assert [(r['name'], r['size']) for r in result['sweep']] == [('Conv2Former-custom', 64),
                                                                 ('Conv2Former-custom', 96)]
    assert result['sweep'][0]['per_pixel_vs_first'] == 1.0
    assert 'ns/pixel' in capsys.readouterr().out


MODEL = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=4, mean=[123.7, 116.3, 103.5],
                           std=[58.4, 57.1, 57.4], to_rgb=True),
    backbone={backbone},
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=4, in_channels=64,
              loss=dict(type='CrossEntropyLoss')))
'''


def test_config_run_against_a_peer_config(tmp_path, capsys):
    """A classifier with the tiny Conv2Former against one with a ConvNeXt of
    the same widths, each on a synthetic batch through its own preprocessor."""
    pytest.importorskip('mmpretrain')
    ours = tmp_path / 'ours.py'
    ours.write_text(MODEL.format(backbone=f"dict(type='Conv2Former', arch={TINY!r}, out_indices=(3, ))"))
    peer = tmp_path / 'peer.py'
    peer.write_text(MODEL.format(backbone="dict(type='ConvNeXt', arch=dict(channels=[16, 32, 48, 64], "
                                          "depths=[1, 1, 1, 1]), out_indices=(3, ), "
                                          "gap_before_final_norm=False)"))
    result = benchmark_main(['--device', 'cpu', str(ours), '--peer-config', str(peer), '--peers', 'recompute-off',
                             '--mode', 'train', '--batch', '2', '--input-size', '64', '--memory',
                             '--repeats', '2', '--warmup', '1'])
    assert [r['name'] for r in result['rows']] == ['ours.py', 'ours.py recompute-off', 'peer.py']
    assert all(r['base'] == 'peer.py' and r['peak_mb'] > 0 for r in result['rows'])
    default, store_all = (r['peak_mb'] for r in result['rows'][:2])
    assert store_all > 1.2 * default  # recompute=False keeps the activations that recompute=True frees
    assert 'speed vs peer.py' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--peer-config', 'x.py'], 'needs a config'),
    (['--peers', 'recompute-off'], 'only in training'),
    (['--switch-to-deploy', '--mode', 'train'], 'inference only'),
    (['--peers', 'selective'], 'unknown peers'),
    (['x.py', '--peers', 'convnext'], 'through --peer-config'),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark_main(argv)
    assert message in capsys.readouterr().err

