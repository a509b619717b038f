# UperNet + Conv2Former-S on ADE20K, 160k iterations, 512x512 crops (the T recipe).
_base_ = './upernet_conv2former-t_8xb2-amp-160k_ade20k-512x512.py'
checkpoint = 'checkpoints/conv2former-s_in1k_backbone.pth'
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3,  # ConvNeXt-S's segmentation rate
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
# S has T's widths (72..576), so the heads' input channels stay as they are
