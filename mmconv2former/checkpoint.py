"""Safe loading of checkpoints: the authors' release files and mm checkpoints.

The release's files are timm checkpoints: a dict with ``state_dict``,
``state_dict_ema`` (optional), ``optimizer``, ``epoch``, ``version``, ``arch``,
``metric`` and ``args`` (an ``argparse.Namespace``). ``torch.load`` with
``weights_only=True`` refuses the Namespace; ``weights_only=False`` would run
whatever a pickle names. We load with ``weights_only=True`` and an explicit
allow-list of the few globals such files need, so a file naming anything else
is refused *before* any of it is executed.
"""
import argparse
import os.path as osp
import pickle
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# Globals a release file may name besides tensors and containers. numpy scalars
# appear when a training script stores a metric computed with numpy.
RELEASE_SAFE_GLOBALS: List = [argparse.Namespace]


def _numpy_scalar_globals() -> List:
    try:
        import numpy as np
    except ImportError:  # numpy is optional for loading tensors
        return []
    found = [np.dtype]
    try:  # numpy >= 2 moved the reconstructors to numpy._core
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    found.append(scalar)
    found += [type(np.dtype(name)) for name in
              ('float64', 'float32', 'int64', 'int32', 'bool')]
    return found


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint names a Python global that is not on the allow-list."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model it is loaded into."""


def safe_load(path: str, extra_safe_globals: Sequence = ()) -> dict:
    """``torch.load`` on CPU that only unpickles allow-listed globals.

    Args:
        path: a local file.
        extra_safe_globals: classes or functions to allow besides
            :data:`RELEASE_SAFE_GLOBALS` (e.g. those mmengine's own
            checkpoints need for resuming).

    Raises:
        FileNotFoundError: the path does not exist (the message says so).
        UnsafeCheckpointError: the file names a global outside the allow-list.
            Nothing from the file has been executed when this is raised.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'checkpoint not found: {path!r}. Check the path (relative paths start '
            'from the current directory); see README "Pretrained weights" for '
            "where the authors' checkpoints come from.")
    # Release files and mmengine's own checkpoints (e.g. a detector used as
    # `init_cfg` with prefix='backbone.') are both readable.
    allowed = list(RELEASE_SAFE_GLOBALS) + mmengine_safe_globals() + list(extra_safe_globals)
    # torch's context manager removes on exit what it added, even entries that
    # were allow-listed before (see allow_mmengine_checkpoints): add only new ones.
    present = set(torch.serialization.get_safe_globals())
    allowed = [g for g in allowed if g not in present]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        names = re.findall(r'GLOBAL (\S+)', str(exc)) or ['an unsupported global']
        raise UnsafeCheckpointError(
            f'refused to load {path!r}: its pickle names {", ".join(names)}, '
            'which is not on the allow-list of objects a checkpoint may '
            'contain, so nothing from it was executed. If you made this file '
            'and trust it, re-save it with only tensors and plain containers '
            '(e.g. torch.save({"state_dict": sd}, path)).') from None


def extract_state_dict(checkpoint: dict, use_ema: bool = False,
                       prefix: Optional[str] = None) -> 'OrderedDict[str, torch.Tensor]':
    """Pick the weights out of a release, mm or bare checkpoint.

    Args:
        checkpoint: what :func:`safe_load` returned.
        use_ema: take ``state_dict_ema`` from a release file (error if absent).
        prefix: keep only keys under this prefix and strip it (e.g.
            ``'backbone.'`` for a detector checkpoint). Without it, a leading
            ``module.`` (DDP) and ``backbone.`` are stripped where present.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    if use_ema:
        if 'state_dict_ema' not in checkpoint:
            raise KeyError('use_ema=True but the checkpoint has no "state_dict_ema" '
                           f'(keys: {sorted(checkpoint)[:8]}); use use_ema=False')
        state = checkpoint['state_dict_ema']
    elif 'state_dict' in checkpoint:
        state = checkpoint['state_dict']
    elif 'model' in checkpoint:
        state = checkpoint['model']
    else:
        state = checkpoint
    out = OrderedDict()
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        if key.startswith('module.'):
            key = key[len('module.'):]
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        elif key.startswith('backbone.'):
            key = key[len('backbone.'):]
        out[key] = value
    if not out:
        hint = (" The authors' release files have no prefix: convert them with "
                'tools/model_converters/conv2former_to_mm.py --for det, or set prefix=None.'
                if prefix else '')
        raise KeyError(f'no weights found in the checkpoint under prefix {prefix!r}.{hint}')
    return out


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> dict:
    """Read channels, depths and kernel size off a Conv2Former state dict."""
    try:
        channels = [int(state_dict['downsample_layers.0.6.weight'].shape[0])]
        channels += [int(state_dict[f'downsample_layers.{i}.1.weight'].shape[0]) for i in (1, 2, 3)]
        kernel = int(state_dict['stages.0.0.attn.att.2.weight'].shape[-1])
    except KeyError as exc:
        raise CheckpointMismatchError(
            f'not a Conv2Former checkpoint: key {exc} is missing') from None
    depths = []
    for i in range(4):
        ids = {int(m.group(1)) for k in state_dict
               for m in [re.match(rf'stages\.{i}\.(\d+)\.', k)] if m}
        depths.append(max(ids) + 1 if ids else 0)
    return dict(channels=channels, depths=depths, kernel_size=kernel)


def arch_name(arch: dict, table: Dict[str, dict]) -> Optional[str]:
    """Name of the variant in ``table`` that ``arch`` equals, if any."""
    for name, settings in table.items():
        if all(list(settings[k]) == list(arch[k]) if isinstance(settings[k], (list, tuple))
               else settings[k] == arch[k] for k in ('channels', 'depths', 'kernel_size')):
            return name
    return None


def check_shapes(model_state: Dict[str, torch.Tensor], ckpt_state: Dict[str, torch.Tensor],
                 hint: str = '') -> None:
    """Raise :class:`CheckpointMismatchError` on the first shape mismatch."""
    for key, value in ckpt_state.items():
        if key in model_state and model_state[key].shape != value.shape:
            raise CheckpointMismatchError(
                f'shape mismatch for {key}: checkpoint {tuple(value.shape)} vs '
                f'model {tuple(model_state[key].shape)}. {hint}'.rstrip())


def split_keys(model_keys: Iterable[str], ckpt_keys: Iterable[str],
               ignore_prefixes: Tuple[str, ...] = ()) -> Tuple[List[str], List[str]]:
    """Missing (in model, not in checkpoint) and unexpected keys."""
    model_keys, ckpt_keys = set(model_keys), set(ckpt_keys)
    missing = sorted(model_keys - ckpt_keys)
    unexpected = sorted(k for k in ckpt_keys - model_keys if not k.startswith(ignore_prefixes))
    return missing, unexpected


def _history_buffer_getattr(owner, name: str):
    """Stands in for ``builtins.getattr`` while unpickling.

    ``HistoryBuffer`` keeps its statistics methods (``min``, ``max``,
    ``current``, ``mean``) in a dict, which pickle stores as
    ``getattr(HistoryBuffer, 'min')``. Allowing the real ``getattr`` would let
    a crafted file walk from any allowed class to ``__globals__`` and run
    code, so only those registered methods of that one class resolve.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if owner is HistoryBuffer:
        # the four built-in statistics, plus any registered with register_statistics
        if name in ('min', 'max', 'current', 'mean'):
            return vars(HistoryBuffer)[name]
        if name in HistoryBuffer._statistics_methods:
            return HistoryBuffer._statistics_methods[name]
    raise pickle.UnpicklingError(
        f'refused getattr({getattr(owner, "__name__", type(owner).__name__)}, {name!r}) while '
        'loading a checkpoint: only HistoryBuffer statistics methods are allowed')


def mmengine_safe_globals() -> List:
    """Globals mmengine's own checkpoints hold besides tensors.

    ``meta.message_hub`` stores :class:`HistoryBuffer` objects whose data are
    numpy arrays and whose statistics methods are pickled through ``getattr``
    (mapped to :func:`_history_buffer_getattr`); everything else is plain
    containers, strings and numbers.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return ([HistoryBuffer, _reconstruct, np.ndarray, (_history_buffer_getattr, 'builtins.getattr')]
            + _numpy_scalar_globals())


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints.

    mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch
    >= 2.6 treats as True, so ``Runner.resume`` and ``load_from`` fail on the
    objects above. Adding exactly those to torch's allow-list (rather than
    turning ``weights_only`` off) keeps every other global refused.
    """
    torch.serialization.add_safe_globals(RELEASE_SAFE_GLOBALS + mmengine_safe_globals())


def check_model_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Refuse a whole-model checkpoint (e.g. for ``tools/test.py``) that does
    not fit ``model``: mmengine would only warn about mismatched shapes and
    evaluate random weights."""
    state = safe_load(path)
    state = state.get('state_dict', state) if isinstance(state, dict) else state
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    # test-time-augmentation wrappers (SegTTAModel, DetTTAModel) hold the model as `.module`
    own = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in model.state_dict().items()}
    hint = 'Use the config the checkpoint was trained with.'
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    if any(k.startswith('stages.') for k in backbone):
        try:
            arch = infer_arch(backbone)
            hint = (f"The checkpoint's backbone has channels={arch['channels']}, depths="
                    f"{arch['depths']}, kernel_size={arch['kernel_size']}. {hint}")
        except CheckpointMismatchError:
            pass
    check_shapes(own, state, hint)
    if not set(own) & set(state):
        raise CheckpointMismatchError(f'none of the model\'s weights are in {path!r}. {hint}')
    extra = [k for k in state if k.startswith('backbone.stages.') and k not in own]
    if extra:
        raise CheckpointMismatchError(f'{path!r} has backbone blocks this model lacks '
                                      f'(e.g. {extra[0]}). {hint}')
