import argparse
import os
import os.path as osp
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

import mmconv2former  # noqa: E402,F401  (registers the modules)


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

