"""Training hooks that keep runs safe and repeatable."""
from typing import Any, Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.runner.utils import set_random_seed

from ..registry import register_hook


def _iter_tensors(data: Any):
    if torch.is_tensor(data):
        yield data
    elif isinstance(data, dict):
        for value in data.values():
            yield from _iter_tensors(value)
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from _iter_tensors(value)


class NonFiniteCheckHook(Hook):
    """Stop training at the first non-finite input batch or loss.

    The input check runs *before* the iteration, so a NaN/Inf image never
    reaches the optimiser. The loss check runs right after it, before the
    checkpoint hook (which has lower priority), so no corrupted weights are
    written to disk. Either error names the iteration and, where the batch
    carries them, the image files.
    """

    priority = 'ABOVE_NORMAL'

    def before_train_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None) -> None:
        if data_batch is None:
            return
        inputs = data_batch.get('inputs') if isinstance(data_batch, dict) else data_batch
        for tensor in _iter_tensors(inputs):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise FloatingPointError(
                    f'non-finite values (NaN/Inf) in the input batch of iteration {runner.iter + 1} '
                    f'(epoch {runner.epoch + 1}, batch {batch_idx}){self._files(data_batch)}. '
                    'Training stopped before the weights were updated; check these images and the '
                    'data pipeline (e.g. a float image with NaNs or a division by zero in a transform).')

    def after_train_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        loss = (outputs or {}).get('loss')
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            raise FloatingPointError(
                f'the loss became non-finite ({float(loss)}) at iteration {runner.iter + 1} '
                f'(epoch {runner.epoch + 1}){self._files(data_batch)}. Training stopped before a '
                'checkpoint of these weights was saved; lower the learning rate, enable gradient '
                'clipping (optim_wrapper.clip_grad) or check the batch.')

    @staticmethod
    def _files(data_batch: Optional[dict]) -> str:
        samples = (data_batch or {}).get('data_samples') if isinstance(data_batch, dict) else None
        paths = [getattr(s, 'img_path', None) or (s.get('img_path') if isinstance(s, dict) else None)
                 for s in (samples or [])]
        paths = [p for p in paths if p]
        return f'; images: {", ".join(paths)}' if paths else ''


class EpochReseedHook(Hook):
    """Reseed every random generator at the start of each epoch.

    mmengine's checkpoints do not store RNG states, so after ``--resume`` the
    random streams (augmentation, RoI sampling, drop path) differ from those of
    an uninterrupted run. Seeding from ``(seed, epoch)`` makes every epoch's
    randomness independent of history: with deterministic settings a resumed
    run reproduces the uninterrupted run's losses exactly.
    """

    priority = 'VERY_HIGH'

    def __init__(self, seed: Optional[int] = None, deterministic: bool = False) -> None:
        self.seed = seed
        self.deterministic = deterministic

    def before_train_epoch(self, runner) -> None:
        base = self.seed if self.seed is not None else runner.seed
        set_random_seed(base + runner.epoch, deterministic=self.deterministic)


__all__: Sequence[str] = ['NonFiniteCheckHook', 'EpochReseedHook']
register_hook(NonFiniteCheckHook)
register_hook(EpochReseedHook)


class SwitchToDeployHook(Hook):
    """Evaluate with every Conv2Former backbone in its deploy form.

    Runs after the runner has loaded the checkpoint (``before_test``), so
    the folded weights are the trained ones; ``tools/test.py --switch-to-deploy`` adds
    it. Test-only: a deployed backbone refuses ``train()``.
    """

    priority = 'VERY_HIGH'

    def before_test(self, runner) -> None:
        from ..models import Conv2Former
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        backbones = [m for m in model.modules() if isinstance(m, Conv2Former)]
        if not backbones:
            raise RuntimeError('--switch-to-deploy: this model has no Conv2Former backbone to switch')
        for backbone in backbones:
            backbone.switch_to_deploy()


register_hook(SwitchToDeployHook)
