_base_ = './mask-rcnn_conv2former-t_fpn_amp-ms-crop-3x_coco.py'
checkpoint = 'checkpoints/conv2former-b_in1k_backbone.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.9,
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))
