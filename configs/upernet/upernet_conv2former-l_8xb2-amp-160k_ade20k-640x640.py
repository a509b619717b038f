# UperNet + Conv2Former-L (ImageNet-22k pre-trained) on ADE20K, 160k
# iterations, 640x640 crops: mmseg's ConvNeXt-L recipe with the backbone
# swapped (the T recipe otherwise; sliding window 640, stride 426).
_base_ = 'mmseg::convnext/convnext-large_upernet_8xb2-amp-160k_ade20k-640x640.py'
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

# The release's ImageNet-22k pre-trained L, converted with
# tools/model_converters/conv2former_to_mm.py (README: "Pretrained weights").
checkpoint = 'checkpoints/conv2former-l_in22k_backbone.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='Conv2Former',
        arch='l',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,  # ConvNeXt-L's segmentation rate
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512, in_index=2))

optim_wrapper = dict(
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(_delete_=True, decay_rate=0.9, decay_type='stage_wise'))

auto_scale_lr = dict(enable=False, base_batch_size=16)
