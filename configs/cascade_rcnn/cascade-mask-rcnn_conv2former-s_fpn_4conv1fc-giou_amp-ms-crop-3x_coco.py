_base_ = './cascade-mask-rcnn_conv2former-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
checkpoint = 'checkpoints/conv2former-s_in1k_backbone.pth'
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.6,
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    neck=dict(in_channels=[72, 144, 288, 576]))
