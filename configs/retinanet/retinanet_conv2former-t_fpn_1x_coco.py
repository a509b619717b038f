# RetinaNet + FPN with Conv2Former-T, 1x schedule (12 epochs), single-scale.
# A single-stage detector: unlike Mask R-CNN, all of it up to the raw class
# scores and box regressions exports to ONNX with standard ops
# (tools/deployment/export_onnx.py, docs/deployment.md).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
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
        # strides 8, 16, 32; FPN adds P6, P7 on top (as mmdet's Swin RetinaNet)
        out_indices=(1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    neck=dict(in_channels=[144, 288, 576], start_level=0, num_outs=5))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise'),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))

# 16 images per iteration (8 GPUs x 2) is what lr 1e-4 was tuned for.
auto_scale_lr = dict(enable=False, base_batch_size=16)
