"""Conv2Former for OpenMMLab 2.x: one backbone for mmdet, mmseg and mmpretrain.

Importing the package (as configs do through ``custom_imports``) registers its
modules (see :mod:`mmconv2former.registry`) and adds the few classes that
mmengine's own checkpoints contain to torch's ``weights_only`` allow-list, so
that ``load_from``, ``--resume`` and mmdet's ``DetInferencer(weights=...)``
work on torch >= 2.6 while every other pickled global stays refused. It needs
only torch and mmengine.
"""
from .checkpoint import allow_mmengine_checkpoints
from .engine import LayerDecayOptimWrapperConstructor  # noqa: F401  (registers with the hooks)
from .models import Conv2Former  # noqa: F401  (registers the backbone)
from .version import __version__

allow_mmengine_checkpoints()

__all__ = ['Conv2Former', 'LayerDecayOptimWrapperConstructor', '__version__']
