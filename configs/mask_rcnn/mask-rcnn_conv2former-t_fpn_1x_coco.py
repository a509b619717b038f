# Mask R-CNN + FPN, Conv2Former-T, 1x schedule (12 epochs), single-scale.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

# ImageNet-1k weights from the authors' release, converted with
# tools/model_converters/conv2former_to_mm.py (README: "Pretrained weights").
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
    _delete_=True,
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise'),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))

# 16 images per iteration (8 GPUs x 2) is what lr 1e-4 was tuned for.
auto_scale_lr = dict(enable=False, base_batch_size=16)
