# Conv2Former-L on ImageNet-1k, the release's recipe (see conv2former-t_8xb128_in1k.py).
# The release's L was pre-trained on ImageNet-22k; this trains it on 1k alone.
_base_ = './conv2former-t_8xb128_in1k.py'

model = dict(
    backbone=dict(arch='l', drop_path_rate=0.5),
    neck=dict(in_channels=1024))
