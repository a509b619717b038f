"""tools/model_converters/conv2former_to_mm.py: round trips and refusals."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, load_tool, randomise
from mmconv2former import Conv2Former
from mmconv2former.checkpoint import CheckpointMismatchError, UnsafeCheckpointError
from reference import ReferenceConv2Former

TOOL = osp.join(ROOT, 'tools', 'model_converters', 'conv2former_to_mm.py')
HEAD_KEYS = ['head.0.weight', 'head.0.bias', 'head.2.weight', 'head.2.bias', 'pred.weight', 'pred.bias']

conv = load_tool('model_converters/conv2former_to_mm.py')


def reference(arch=TINY, seed=0, num_classes=10) -> ReferenceConv2Former:
    return randomise(ReferenceConv2Former(**arch, num_classes=num_classes), seed).eval()


def meta_state(arch: str, num_classes: int = 1000) -> dict:
    """A release state dict of a real variant as shape-only (meta) tensors."""
    settings = Conv2Former.arch_settings[arch]
    shapes = conv.expected_release_state(settings, num_classes)
    return {k: torch.empty(v.shape, device='meta') for k, v in shapes.items()}


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_backbone_round_trip_for_dense_tasks(release_checkpoint, tmp_path, task, capsys):
    ref = reference()
    src = release_checkpoint(ref.state_dict())
    dst = str(tmp_path / f'{task}.pth')
    summary = conv.main([src, dst, '--for', task])

    assert sorted(summary['dropped_keys']) == sorted(HEAD_KEYS)
    out = capsys.readouterr().out
    assert 'dropped 6 classifier tensors' in out and 'pred.weight' in out
    assert 'optimizer' in out and 'args' in out  # dropped entries are listed too
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['task'] == task and saved['meta']['weights'] == 'state_dict'
    assert all(k.startswith('backbone.') for k in saved['state_dict'])

    # what mmdet / mmseg configs do: init_cfg Pretrained with prefix='backbone.'
    model = Conv2Former(TINY, out_norm=False,
                        init_cfg=dict(type='Pretrained', checkpoint=dst, prefix='backbone.'))
    model.init_weights()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(model(x), ref.forward_stages(x)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_classifier_keys_and_ema_choice(release_checkpoint, tmp_path):
    plain, ema = reference(seed=0), reference(seed=1)
    src = release_checkpoint(plain.state_dict(), ema.state_dict())
    dst = str(tmp_path / 'cls.pth')
    summary = conv.convert(src, dst, 'cls', use_ema=True)
    assert summary['weights'] == 'state_dict_ema' and summary['dropped_keys'] == []
    assert 'state_dict' in summary['dropped_entries']
    state = torch.load(dst, weights_only=True)['state_dict']
    assert {k for k in state if not k.startswith('backbone.')} == {
        'neck.proj.weight', 'neck.proj.bias', 'neck.norm.weight', 'neck.norm.bias',
        'head.fc.weight', 'head.fc.bias'}
    torch.testing.assert_close(state['head.fc.weight'], ema.pred.weight)
    torch.testing.assert_close(state['backbone.stages.2.2.mlp.fc1.weight'],
                               ema.stages[2][2].mlp.fc1.weight)


def test_refuses_to_overwrite_dst(release_checkpoint, tmp_path):
    src = release_checkpoint(reference().state_dict())
    dst = tmp_path / 'out.pth'
    dst.write_bytes(b'keep me')
    with pytest.raises(FileExistsError, match='--force'):
        conv.convert(src, str(dst))
    assert dst.read_bytes() == b'keep me'
    conv.convert(src, str(dst), force=True)
    assert 'state_dict' in torch.load(str(dst), weights_only=True)
    with pytest.raises(FileExistsError, match='source'):
        conv.convert(src, src, force=True)  # never overwrite the release file itself


def test_refuses_wrong_variant():
    with pytest.raises(CheckpointMismatchError, match=r"Conv2Former-t .*holds Conv2Former-n"):
        conv.validate(meta_state('n'), arch='t')
    # B and B-22k differ only in the kernel size of the modulation
    with pytest.raises(CheckpointMismatchError, match='kernel_size=7.*kernel_size=11'):
        conv.validate(meta_state('b'), arch='b_22k')
    info = conv.validate(meta_state('l', num_classes=21841), arch='l')
    assert info['name'] == 'l' and info['num_classes'] == 21841


def test_refuses_unreleased_variant_when_one_is_named(release_checkpoint, tmp_path):
    src = release_checkpoint(reference().state_dict())
    with pytest.raises(CheckpointMismatchError, match='unreleased variant'):
        conv.convert(src, str(tmp_path / 'x.pth'), arch='n')
    assert not (tmp_path / 'x.pth').exists()


@pytest.mark.parametrize('damage', ['missing_block_key', 'extra_block', 'wrong_shape', 'no_head'])
def test_refuses_inconsistent_tensors(damage):
    state = meta_state('t')
    if damage == 'missing_block_key':
        del state['stages.2.5.mlp.pos.weight']
        error, text = CheckpointMismatchError, 'missing.*stages.2.5.mlp.pos.weight'
    elif damage == 'extra_block':
        state['stages.3.3.layer_scale_1'] = torch.empty(576, device='meta')
        # a stray tensor of a fourth block makes stage 3 look four deep, all but one tensor missing
        error, text = CheckpointMismatchError, r'depths=\[3, 3, 12, 4\].*missing.*stages.3.3'
    elif damage == 'wrong_shape':
        state['stages.1.0.attn.v.weight'] = torch.empty(144, 72, 1, 1, device='meta')
        error, text = CheckpointMismatchError, r'stages.1.0.attn.v.weight: checkpoint \(144, 72, 1, 1\)'
    else:
        del state['head.2.weight']
        error, text = CheckpointMismatchError, 'missing.*head.2.weight'
    with pytest.raises(error, match=text):
        conv.validate(state)


def test_refuses_cls_without_classifier_and_missing_ema(release_checkpoint, tmp_path):
    backbone_only = {k: v for k, v in reference().state_dict().items()
                     if not k.startswith(('head.', 'pred.'))}
    src = release_checkpoint(backbone_only)
    with pytest.raises(CheckpointMismatchError, match='--for det'):
        conv.convert(src, str(tmp_path / 'a.pth'), 'cls')
    conv.convert(src, str(tmp_path / 'b.pth'), 'det')  # fine for a dense task
    with pytest.raises(KeyError, match='state_dict_ema'):
        conv.convert(src, str(tmp_path / 'c.pth'), 'det', use_ema=True)


class _CreatesFile:
    """Unpickling this calls ``open(path, 'w')``: a file appears if it runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_refuses_pickle_with_foreign_global_without_running_it(release_checkpoint, tmp_path):
    marker = tmp_path / 'payload_ran'
    src = release_checkpoint(reference().state_dict(), name='evil.pth.tar', extra=_CreatesFile(str(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r'names io\.open'):
        conv.convert(src, str(tmp_path / 'out.pth'))
    assert not marker.exists()
    assert not (tmp_path / 'out.pth').exists()
    # the payload is real: a plain unpickling would have run it
    torch.load(src, weights_only=False)['extra'].close()
    assert marker.exists()


def test_command_line_exit_status_and_report(release_checkpoint, tmp_path):
    src = release_checkpoint(reference().state_dict())
    dst = str(tmp_path / 'cli.pth')
    run = [sys.executable, TOOL, src, dst, '--for', 'det']
    ok = subprocess.run(run, capture_output=True, text=True, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert 'unreleased variant' in ok.stdout and 'wrote' in ok.stdout
    refused = subprocess.run(run, capture_output=True, text=True, cwd=str(tmp_path))
    assert refused.returncode == 1
    assert 'exists; pass --force' in refused.stderr
