# UperNet + Conv2Former-B on ADE20K, 160k iterations, 512x512 crops (the T recipe).
_base_ = './upernet_conv2former-t_8xb2-amp-160k_ade20k-512x512.py'
checkpoint = 'checkpoints/conv2former-b_in1k_backbone.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.4,  # ConvNeXt-B's segmentation rate
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
