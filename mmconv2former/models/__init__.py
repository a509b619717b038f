from .classifier import Conv2FormerNeck  # registers the classification neck
from .conv2former import Conv2Former, Conv2FormerBlock, ConvMLP, ConvModulation
from .layers import ConvNHWC, DropPath, LayerNorm2d

__all__ = ['Conv2Former', 'Conv2FormerBlock', 'Conv2FormerNeck', 'ConvMLP', 'ConvModulation',
           'ConvNHWC', 'DropPath', 'LayerNorm2d']
