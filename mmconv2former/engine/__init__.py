from .hooks import EpochReseedHook, NonFiniteCheckHook, SwitchToDeployHook
from .layer_decay import LayerDecayOptimWrapperConstructor

__all__ = ['EpochReseedHook', 'LayerDecayOptimWrapperConstructor', 'NonFiniteCheckHook',
           'SwitchToDeployHook']
