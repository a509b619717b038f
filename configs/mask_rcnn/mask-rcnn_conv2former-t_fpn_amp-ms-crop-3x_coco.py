# Mask R-CNN + FPN, Conv2Former-T, 3x schedule with multi-scale + crop
# augmentation and AMP: mmdet's ConvNeXt-T recipe (AdamW lr 1e-4, wd 0.05,
# layer-wise lr decay 0.95, 36 epochs, steps at 27 and 33), backbone swapped.
_base_ = 'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py'
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
    # num_layers is not needed: the backbone counts its own depths
    paramwise_cfg=dict(_delete_=True, decay_rate=0.95, decay_type='layer_wise'))

auto_scale_lr = dict(enable=False, base_batch_size=16)
