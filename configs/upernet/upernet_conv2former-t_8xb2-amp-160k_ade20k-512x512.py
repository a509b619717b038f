# UperNet + Conv2Former-T on ADE20K, 160k iterations, 512x512 crops: mmseg's
# ConvNeXt-T recipe (AdamW lr 1e-4, wd 0.05, stage-wise lr decay 0.9, linear
# warm-up for 1500 iterations then poly, AMP, 8 GPUs x 2 images, auxiliary FCN
# head on stage 3, sliding-window test) with the backbone swapped.
# On a CPU, tools/train.py turns SyncBN into BN and AMP into fp32 by itself.
_base_ = 'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'
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
        # ConvNeXt-T's segmentation rate; the paper gives none for ADE20K
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    decode_head=dict(in_channels=[72, 144, 288, 576]),
    auxiliary_head=dict(in_channels=288, in_index=2))

optim_wrapper = dict(
    constructor='LayerDecayOptimWrapperConstructor',
    # num_layers is not needed: the backbone counts its own stages
    paramwise_cfg=dict(_delete_=True, decay_rate=0.9, decay_type='stage_wise'))

# lr 1e-4 was tuned for 16 images per iteration (8 GPUs x 2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
