# Conv2Former-N on ImageNet-1k, the release's recipe (see conv2former-t_8xb128_in1k.py).
_base_ = './conv2former-t_8xb128_in1k.py'

model = dict(
    backbone=dict(arch='n', drop_path_rate=0.1),
    neck=dict(in_channels=512))
