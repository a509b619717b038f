from .hooks import EpochReseedHook, NonFiniteCheckHook
from .layer_decay import LayerDecayOptimWrapperConstructor

__all__ = ['EpochReseedHook', 'LayerDecayOptimWrapperConstructor', 'NonFiniteCheckHook']
