# Fine-tune the release's ImageNet-22k pre-trained Conv2Former-L (its 1k
# classifier) at 384x384 on ImageNet-1k; recipe and pipelines as
# conv2former-b_in22k-pre_8xb64_in1k-384px.py. Also the test config of the
# release's converted L 384 checkpoint (87.7 % top-1 in the release).
_base_ = './conv2former-b_in22k-pre_8xb64_in1k-384px.py'

load_from = 'checkpoints/conv2former-l_in22k-pre_in1k.pth'

model = dict(
    backbone=dict(arch='l', drop_path_rate=0.3),
    neck=dict(in_channels=1024))
