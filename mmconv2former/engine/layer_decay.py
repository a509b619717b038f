"""Layer-wise learning-rate decay for any backbone with ``get_layer_depth``.

mmdet's ``LearningRateDecayOptimizerConstructor`` (shared by mmseg) refuses
every backbone whose class name lacks "ConvNeXt" and hard-codes ConvNeXt's
9- or 27-block third stage. Here the backbone itself says which layer a
parameter belongs to (``Conv2Former.get_layer_depth`` counts its real depths),
so the constructor needs no class-name checks and serves mmdet, mmseg and
mmpretrain alike.
"""
import warnings
from typing import Dict, List

import torch.nn as nn
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor

from ..registry import register_optim_wrapper_constructor


class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Scale each parameter's lr by ``decay_rate ** (num_layers - 1 - layer_id)``.

    ``paramwise_cfg`` keys:
        decay_rate (float): per-layer factor, e.g. 0.7 (detection) or 0.9.
        decay_type (str): ``'layer_wise'`` (stage 3 in groups of three
            blocks, as ConvNeXt does) or ``'stage_wise'`` (one id per stage).
            Defaults to ``'layer_wise'``.
        num_layers (int, optional): accepted for configs written for ConvNeXt
            and ignored: the count comes from the backbone's real depths.

    Norm weights and biases, all biases and layer scales (every 1-D
    parameter) get no weight decay; everything else gets the optimizer's.
    Parameters outside the backbone (neck, heads) get the top id: scale 1.
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = dict(self.paramwise_cfg)
        decay_rate = cfg.get('decay_rate', 1.0)
        decay_type = cfg.get('decay_type', 'layer_wise')
        if decay_type not in ('layer_wise', 'stage_wise'):
            raise ValueError(f"decay_type must be 'layer_wise' or 'stage_wise', got {decay_type!r}")
        backbone = getattr(module, 'backbone', None)
        if backbone is None or not hasattr(backbone, 'get_layer_depth'):
            raise TypeError(
                f'{type(self).__name__} needs model.backbone.get_layer_depth(name, prefix); '
                f'{type(backbone).__name__ if backbone is not None else type(module).__name__} has none. '
                'Use a backbone that defines it (Conv2Former, mmpretrain ConvNeXt) or the default constructor.')
        stage_wise = decay_type == 'stage_wise'

        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if stage_wise:
                layer_id, num_layers = backbone.get_layer_depth(name, 'backbone.', stage_wise=True)
            else:
                layer_id, num_layers = backbone.get_layer_depth(name, 'backbone.')
            no_decay = param.ndim == 1 or name.endswith('.bias') or 'layer_scale' in name
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate ** (num_layers - 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], lr_scale=scale, group_name=key,
                                   lr=scale * self.base_lr)
                if no_decay or self.base_wd is not None:
                    groups[key]['weight_decay'] = 0.0 if no_decay else self.base_wd
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        if cfg.get('num_layers') is not None and cfg['num_layers'] + 2 != num_layers:
            warnings.warn(f"paramwise_cfg.num_layers={cfg['num_layers']} is ignored: the backbone "
                          f'has {num_layers - 2} layer groups ({decay_type})')
        rank, _ = get_dist_info()
        if rank == 0:
            summary = ', '.join(f'{k}: lr x{v["lr_scale"]:.4g} wd {v.get("weight_decay")} '
                                f'({len(v["params"])} tensors)' for k, v in sorted(groups.items()))
            print_log(f'layer decay ({decay_type}, rate {decay_rate}): {summary}', logger='current')
        params.extend(groups.values())


register_optim_wrapper_constructor(LayerDecayOptimWrapperConstructor)
