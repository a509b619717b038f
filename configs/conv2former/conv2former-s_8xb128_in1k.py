# Conv2Former-S on ImageNet-1k, the release's recipe (see conv2former-t_8xb128_in1k.py).
_base_ = './conv2former-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='s', drop_path_rate=0.3))
