"""Training curves from mmengine's ``vis_data/scalars.json`` as a PNG."""
import glob
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple


def find_scalars(work_dir: str) -> str:
    """The newest run's scalar log under ``work_dir``.

    mmengine's LocalVisBackend writes ``<timestamp>/vis_data/scalars.json``;
    with some visualizers only the LoggerHook's ``<timestamp>/<timestamp>.json``
    (same one-JSON-record-per-line format) is written.
    """
    for pattern in ('*/vis_data/scalars.json', '*/*.json'):
        found = sorted(p for p in glob.glob(osp.join(work_dir, pattern))
                       if pattern != '*/*.json' or osp.basename(p)[:-5] == osp.basename(osp.dirname(p)))
        if found:
            return found[-1]
    raise FileNotFoundError(f'no training log (vis_data/scalars.json or <timestamp>.json) under '
                            f'{work_dir!r}: has training run there?')


def read_scalars(path: str) -> Tuple[Dict[str, List[Tuple[int, float]]], Dict[str, List[Tuple[int, float]]]]:
    """Split mmengine's log into training series (by iteration) and
    evaluation series (by the iteration / epoch at which they were logged)."""
    train: Dict[str, List[Tuple[int, float]]] = {}
    val: Dict[str, List[Tuple[int, float]]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            step = int(record.get('step', record.get('iter', 0)))
            target = train if 'loss' in record else val
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ('step', 'iter', 'epoch', 'time',
                                                                   'data_time', 'memory', 'lr'):
                    target.setdefault(key, []).append((step, float(value)))
    return train, val


def plot_training_curves(work_dir: str, out_file: str, metrics: Sequence[str],
                         losses: Optional[Sequence[str]] = None, title: str = '') -> str:
    """Plot losses (left) and evaluation metrics (right) into ``out_file``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    train, val = read_scalars(find_scalars(work_dir))
    losses = losses or sorted(k for k in train if k.startswith('loss'))
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for key in losses:
        if key in train:
            steps, values = zip(*train[key])
            ax_loss.plot(steps, values, label=key, linewidth=1.5 if key == 'loss' else 0.8)
    ax_loss.set(xlabel='iteration', ylabel='loss', title='training loss', yscale='log')
    ax_loss.legend(fontsize=7)
    for key in metrics:
        if key in val:
            steps, values = zip(*val[key])
            ax_metric.plot(steps, values, marker='o', label=key)
    ax_metric.set(xlabel='epoch / evaluation step', ylabel='metric', title='validation')
    ax_metric.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
