"""Robustness: resume after a crash, safe checkpoints, AMP, distributed
training on CPU, and clear errors for bad input (docs/bad_input.md)."""
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY
from mmconv2former import Conv2Former
from mmconv2former.checkpoint import CheckpointMismatchError, UnsafeCheckpointError, safe_load
from mmconv2former.engine.hooks import NonFiniteCheckHook
from reference import ReferenceConv2Former

DEMO_CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_conv2former-n_fpn_demo.py')


def demo_args(root, work_dir, epochs=1, extra=()):
    root = root.rstrip('/') + '/'
    return [DEMO_CONFIG, '--work-dir', str(work_dir), '--cfg-options',
            f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}annotations/instances_val.json',
            f'test_evaluator.ann_file={root}annotations/instances_val.json',
            f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs + 1}',
            'default_hooks.checkpoint.interval=1', 'train_dataloader.batch_size=2',
            'default_hooks.logger.interval=1', 'log_processor.window_size=1', *extra]


def run_tool(tool, args, env=None, check=True):
    cmd = [sys.executable, osp.join(ROOT, 'tools', tool), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f'{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


def train_main(args):
    import tools.train as train_tool
    return train_tool.main(list(map(str, args)))


def test_main(args):
    import tools.test as test_tool
    return test_tool.main(list(map(str, args)))


test_main.__test__ = False  # a helper, not a test


def iteration_losses(work_dir):
    losses = {}
    for path in sorted(__import__('glob').glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        for line in open(path):
            record = json.loads(line)
            if 'loss' in record:
                losses[record['step']] = record['loss']
    return losses


def evil_checkpoint(path, marker):
    """A checkpoint whose unpickling would create ``marker``."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': Payload()}, path)
    return path


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_after_sigkill_repeats_uninterrupted_losses(coco_demo, tmp_path):
    full, crashed = tmp_path / 'full', tmp_path / 'crashed'
    run_tool('train.py', demo_args(coco_demo, full, epochs=3))
    # Kill the second run with SIGKILL in epoch 3, after the epoch-2 checkpoint.
    killer = tmp_path / 'kill_in_epoch3.py'
    killer.write_text(textwrap.dedent(f'''
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from mmengine.hooks import Hook
        from mmengine.registry import HOOKS
        import tools.train as train

        @HOOKS.register_module()
        class KillHook(Hook):
            def before_train_iter(self, runner, batch_idx, data_batch=None):
                if runner.epoch == 2 and batch_idx == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        def load_config(*args, **kwargs):
            cfg = original(*args, **kwargs)
            cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type='KillHook')]
            return cfg
        original, train.load_config = train.load_config, load_config
        train.main(sys.argv[1:])
    '''))
    args = demo_args(coco_demo, crashed, epochs=3)
    proc = subprocess.run([sys.executable, str(killer), *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert osp.isfile(crashed / 'epoch_2.pth') and not osp.isfile(crashed / 'epoch_3.pth')
    run_tool('train.py', [args[0], '--resume', *args[1:]])
    assert osp.isfile(crashed / 'epoch_3.pth')
    expected, resumed = iteration_losses(full), iteration_losses(crashed)
    assert sorted(expected) == list(range(1, 13))
    assert set(resumed) == set(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # the optimiser and scheduler state came back too: same final weights
    a = safe_load(str(full / 'epoch_3.pth'))
    b = safe_load(str(crashed / 'epoch_3.pth'))
    assert a['meta']['epoch'] == b['meta']['epoch'] == 3
    assert a['meta']['iter'] == b['meta']['iter'] == 12
    assert a['message_hub']['runtime_info']['iter'] == b['message_hub']['runtime_info']['iter']
    assert a['optimizer']['param_groups'][0]['lr'] == b['optimizer']['param_groups'][0]['lr']
    for key in a['state_dict']:
        torch.testing.assert_close(a['state_dict'][key], b['state_dict'][key], rtol=1e-4, atol=1e-6)


def test_new_run_never_overwrites_earlier_one(tmp_path):
    from mmconv2former.engine.runtime import choose_work_dir
    work = tmp_path / 'wd'
    work.mkdir()
    (work / 'epoch_1.pth').write_bytes(b'earlier run')
    new, note = choose_work_dir(str(work), resume=None)
    assert new == f'{work}-run2' and 'kept' in note
    os.makedirs(new)
    (tmp_path / 'wd-run2' / 'last_checkpoint').write_text('x')
    assert choose_work_dir(str(work), None)[0] == f'{work}-run3'
    assert choose_work_dir(str(work), 'auto')[0] == f'{work}-run2'  # newest run
    assert (work / 'epoch_1.pth').read_bytes() == b'earlier run'
    empty = tmp_path / 'fresh'
    assert choose_work_dir(str(empty), None) == (str(empty), None)


# ----------------------------------------------------------------------------- safe checkpoints
def test_every_load_path_refuses_unsafe_pickles(tmp_path, coco_demo):
    marker = tmp_path / 'PWNED'
    path = evil_checkpoint(str(tmp_path / 'evil.pth'), marker)
    with pytest.raises(UnsafeCheckpointError, match='posix.system|os.system|allow-list'):
        safe_load(path)
    backbone = Conv2Former(TINY, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(UnsafeCheckpointError, match='nothing from it was executed'):
        backbone.init_weights()
    # mmengine's loader (resume / load_from / inferencers) goes through torch's allow-list
    args = demo_args(coco_demo, tmp_path / 'wd')
    with pytest.raises(Exception, match='Weights only load failed'):
        train_main([args[0], '--resume', path, *args[1:]])
    with pytest.raises(UnsafeCheckpointError, match='refused to load'):
        test_main([DEMO_CONFIG, path, *demo_args(coco_demo, tmp_path / 'ev')[1:]])
    assert not marker.exists()


def test_restricted_getattr_only_resolves_history_buffer_statistics():
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    from mmconv2former.checkpoint import _history_buffer_getattr
    assert _history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for owner, name in ((HistoryBuffer, '__init__'), (HistoryBuffer, '__class__'), (os, 'system')):
        with pytest.raises(pickle.UnpicklingError, match='refused getattr'):
            _history_buffer_getattr(owner, name)


# ----------------------------------------------------------------------------- AMP
def test_bf16_autocast_training_is_finite_with_large_activations():
    torch.manual_seed(0)
    model = Conv2Former(TINY, layer_scale_init_value=1.0).train()
    model.init_weights()
    with torch.no_grad():  # push stage-4 activations far beyond fp16's comfort zone
        model.downsample_layers[3][1].weight.mul_(400.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
        assert outs[-1].dtype in (torch.bfloat16, torch.float32)
        loss = sum(o.float().pow(2).mean() for o in outs)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the channel norms ran in fp32 (a hand-written norm would square ~1e4 values in low precision)
    pre_norm = model.stages[3][0].attn.norm
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = pre_norm(torch.full((1, 2, 2, 64), 3e4) + torch.randn(1, 2, 2, 64))
    assert torch.isfinite(y).all()


# ----------------------------------------------------------------------------- distributed
RANK_DUMP = """
import os
import torch
from mmengine.runner import Runner

_train = Runner.train


def train(self):  # test-only: each rank saves the weights it ended with
    model = _train(self)
    module = model.module if hasattr(model, 'module') else model  # unwrap DDP
    rank = int(os.environ.get('RANK', 0))
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()},
               os.path.join(self.work_dir, f'rank{rank}_weights.pth'))
    return model


Runner.train = train
"""


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_in_sync(coco_demo, tmp_path):
    (tmp_path / 'rank_dump.py').write_text(RANK_DUMP)
    work = tmp_path / 'dist'
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT='29533', PYTHONPATH=f'{tmp_path}:{ROOT}')
    args = demo_args(coco_demo, work, epochs=1, extra=['custom_imports.imports=[mmconv2former,rank_dump]'])
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), args[0], '2', *args[1:]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'Distributed training: True' in proc.stdout + proc.stderr
    assert osp.isfile(work / 'epoch_1.pth')
    losses = iteration_losses(str(work))
    # 8 images, 2 per process per iteration, 2 processes: 2 iterations
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # DDP keeps replicas identical: both ranks ended with the same weights
    states = [torch.load(str(work / f'rank{r}_weights.pth'), weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    saved = safe_load(str(work / 'epoch_1.pth'))['state_dict']
    for key, value in saved.items():
        assert torch.equal(value, states[0][key]), key


# ----------------------------------------------------------------------------- bad input
def test_missing_config_and_checkpoint_paths(tmp_path):
    proc = run_tool('train.py', ['configs/nope.py'], check=False)  # as a user sees it
    assert proc.returncode != 0 and 'config not found' in proc.stderr and 'configs/' in proc.stderr
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        test_main([DEMO_CONFIG, str(tmp_path / 'missing.pth')])
    backbone = Conv2Former(TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'x.pth')))
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        backbone.init_weights()


def test_checkpoint_of_another_variant_is_refused_by_test_tool(coco_demo, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmdet.registry import MODELS
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.model.backbone.arch = 't'
    cfg.model.neck.in_channels = [72, 144, 288, 576]
    with DefaultScope.overwrite_default_scope('mmdet'):
        other = MODELS.build(cfg.model)
    path = str(tmp_path / 't.pth')
    torch.save({'state_dict': other.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match='shape mismatch.*kernel_size=11'):
        test_main([DEMO_CONFIG, path, *demo_args(coco_demo, tmp_path / 'e')[1:]])


def test_annotation_file_missing_or_malformed(coco_demo, tmp_path):
    with pytest.raises(FileNotFoundError, match='annotation file not found'):
        train_main(demo_args(str(tmp_path / 'nowhere'), tmp_path / 'w1'))
    broken = tmp_path / 'broken'
    os.makedirs(broken / 'annotations')
    for split in ('train', 'val'):
        os.symlink(osp.join(coco_demo, split), broken / split)
    (broken / 'annotations' / 'instances_train.json').write_text('{"images": [')
    (broken / 'annotations' / 'instances_val.json').write_text('{}')
    with pytest.raises(ValueError, match='instances_train.json.*is not valid JSON'):
        train_main(demo_args(str(broken), tmp_path / 'w2'))


def test_unreadable_image_is_named(coco_demo, tmp_path):
    import shutil
    bad = tmp_path / 'bad'
    shutil.copytree(coco_demo, bad)
    victim = bad / 'train' / '000003.png'
    victim.write_bytes(b'not an image')
    with pytest.raises(Exception, match='000003.png'):
        train_main(demo_args(str(bad), tmp_path / 'w'))


def test_unwritable_work_dir(coco_demo, tmp_path):
    from mmconv2former.engine.runtime import check_writable
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(PermissionError, match='cannot write to the work dir.*--work-dir'):
        check_writable(str(blocker / 'sub'))
    with pytest.raises(PermissionError, match='cannot write to the work dir'):
        train_main(demo_args(coco_demo, blocker / 'sub'))


def test_non_finite_input_stops_before_the_update():
    class Runner:
        iter, epoch = 41, 3
    batch = dict(inputs=[torch.ones(3, 8, 8), torch.tensor([[float('nan')]])],
                 data_samples=[dict(img_path='a.png'), dict(img_path='b.png')])
    with pytest.raises(FloatingPointError, match='iteration 42.*a.png, b.png'):
        NonFiniteCheckHook().before_train_iter(Runner(), 0, batch)
    NonFiniteCheckHook().before_train_iter(Runner(), 0, dict(inputs=[torch.ones(3, 8, 8)]))
    with pytest.raises(FloatingPointError, match='loss became non-finite.*iteration 42'):
        NonFiniteCheckHook().after_train_iter(Runner(), 0, None, dict(loss=torch.tensor(float('inf'))))


def test_train_tool_adds_the_non_finite_check(coco_demo, tmp_path):
    from mmconv2former.engine.runtime import load_config
    cfg = load_config(DEMO_CONFIG, work_dir=str(tmp_path / 'w'), mode='train',
                      cfg_options={'train_dataloader.dataset.data_root': coco_demo + '/',
                                   'val_dataloader.dataset.data_root': coco_demo + '/'})
    assert [h['type'] for h in cfg.custom_hooks].count('NonFiniteCheckHook') == 1


@pytest.mark.parametrize('channels', [1, 4])
def test_wrong_channel_count_names_the_fix(channels):
    with pytest.raises(ValueError, match='Convert grey/RGBA images to RGB'):
        Conv2Former(TINY)(torch.randn(1, channels, 64, 64))


def test_input_smaller_than_total_stride():
    with pytest.raises(ValueError, match='at least 32x32'):
        Conv2Former(TINY)(torch.randn(1, 3, 31, 64))


def test_variant_mismatch_in_backbone_loading(release_checkpoint):
    path = release_checkpoint(ReferenceConv2Former(**dict(TINY, kernel_size=3)).state_dict())
    with pytest.raises(CheckpointMismatchError, match=r'\(16, 1, 3, 3\) vs model \(16, 1, 5, 5\)'):
        Conv2Former(TINY).load_release_weights(path)


def test_safe_load_keeps_the_global_allow_list(tmp_path, release_checkpoint):
    """torch.serialization.safe_globals removes on exit what it added; loading a
    release file must not drop the mmengine classes added at import."""
    from mmengine.logging.history_buffer import HistoryBuffer
    before = set(torch.serialization.get_safe_globals())
    assert HistoryBuffer in before
    safe_load(release_checkpoint({'w': torch.zeros(1)}))
    assert set(torch.serialization.get_safe_globals()) == before
