"""What the three embedded demos (tools/demo/*.py) share: overrides from the
command line, training and evaluating through tools/train.py's machinery, and
the summary they print and save."""
import argparse
import json
import os.path as osp
import time
from typing import Dict, Iterable, Sequence, Tuple


def parse_cfg_options(items: Sequence[str]) -> dict:
    """``['a.b=1', 'c=[1,2]']`` -> dict, exactly as ``--cfg-options`` parses them."""
    if not items:
        return {}
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    return parser.parse_args(['--o', *items]).o


def train_and_test(config: str, options: dict, work_dir: str) -> Tuple:
    """Train with the tools' runner, then evaluate the final weights.

    Returns ``(cfg, runner, metrics, train_seconds, checkpoint)``; the run's
    real work dir is ``runner.work_dir`` (a new ``-runN`` one if ``work_dir``
    already held an earlier run).
    """
    from ..engine.runtime import build_runner, load_config
    cfg = load_config(config, options, work_dir=work_dir, mode='train')
    runner = build_runner(cfg)
    start = time.time()
    runner.train()
    train_seconds = time.time() - start
    metrics = runner.test()
    with open(osp.join(runner.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    return cfg, runner, metrics, train_seconds, checkpoint


def report(work_dir: str, title: str, summary: Dict, hide: Iterable[str] = ()) -> Dict:
    """Save ``summary.json`` in the work dir and print the summary."""
    with open(osp.join(work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f'\n=== {title} ===')
    for key, value in summary.items():
        if key not in hide:
            print(f'{key:>14}: {value}')
    return summary
