"""The package's registry scope and its link to the OpenMMLab libraries.

mmdet, mmsegmentation and mmpretrain each have a ``MODELS`` registry whose
parent is mmengine's root ``MODELS``; a bare ``type='Conv2Former'`` looked up
in any of them falls back to that root. So one registration in the root makes
our modules buildable from all three libraries' configs without importing any
of them here (they stay optional). Our own ``mmconv2former`` scope, a child of
the root, also serves ``type='mmconv2former.Conv2Former'``.
"""
from typing import Type

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmconv2former',
                  locations=['mmconv2former.models'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmconv2former', locations=['mmconv2former.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmconv2former',
                 locations=['mmconv2former.engine'])


def _register(own: Registry, root: Registry, cls: Type) -> Type:
    own.register_module(module=cls)
    root.register_module(module=cls)
    return cls


def register_model(cls: Type) -> Type:
    """Register a model class in our scope and in the shared root scope."""
    return _register(MODELS, MMENGINE_MODELS, cls)


def register_optim_wrapper_constructor(cls: Type) -> Type:
    """Register an optimiser-wrapper constructor in our scope and the root."""
    return _register(OPTIM_WRAPPER_CONSTRUCTORS, MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, cls)


def register_hook(cls: Type) -> Type:
    """Register a runner hook in our scope and the root."""
    return _register(HOOKS, MMENGINE_HOOKS, cls)
