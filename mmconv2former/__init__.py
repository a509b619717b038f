"""Conv2Former for OpenMMLab 2.x: one backbone for mmdet, mmseg and mmpretrain.

Importing the package registers its modules (see :mod:`mmconv2former.registry`);
it needs only torch and mmengine.
"""
from .models import Conv2Former  # noqa: F401  (registers the backbone)
from .version import __version__

__all__ = ['Conv2Former', '__version__']
