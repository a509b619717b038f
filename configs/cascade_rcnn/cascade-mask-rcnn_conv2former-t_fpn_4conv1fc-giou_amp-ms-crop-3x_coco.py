# Cascade Mask R-CNN + FPN with 4conv1fc GIoU box heads, Conv2Former-T, 3x
# multi-scale + crop, AMP: mmdet's ConvNeXt-T cascade recipe (AdamW lr 2e-4,
# wd 0.05, layer-wise lr decay 0.7) with the backbone swapped. Stochastic
# depth 0.2 / 0.6 / 0.9 for T / S / B, as the paper reports for this setting.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

checkpoint = 'checkpoints/conv2former-t_in1k_backbone.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='Conv2Former',
        arch='t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    neck=dict(in_channels=[72, 144, 288, 576]))

optim_wrapper = dict(
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(_delete_=True, decay_rate=0.7, decay_type='layer_wise'))

auto_scale_lr = dict(enable=False, base_batch_size=16)
