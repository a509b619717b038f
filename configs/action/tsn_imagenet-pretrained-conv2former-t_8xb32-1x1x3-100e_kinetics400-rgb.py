# TSN with Conv2Former-T on Kinetics-400 RGB videos, 3 segments of one frame:
# mmaction2's ResNet-50 TSN recipe (SGD lr 0.01, momentum 0.9, weight decay
# 1e-4, gradient clipping at 40, 100 epochs, lr x0.1 at 40 and 80, 8 GPUs x 32
# clips, 224x224 multi-scale crops; test with 25 clips x 10 crops) with the
# backbone swapped, as mmaction2 does for its mmpretrain / timm backbones
# (recognition/tsn/custom_backbones/: same recipe). Each of the N*3 frames
# goes through the backbone alone; TSNHead pools and averages the segments.
# Written with tools/misc/swap_backbone.py (--arch t) plus the pretrained weights.
_base_ = 'mmaction::recognition/tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb.py'
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

# ImageNet-1k weights from the authors' release, converted with
# tools/model_converters/conv2former_to_mm.py (README: "Pretrained weights").
checkpoint = 'checkpoints/conv2former-t_in1k_backbone.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        # Recognizer2D takes the single output out of the backbone's tuple only
        # for backbones from mmpretrain's scope; the name resolves to ours
        type='mmpretrain.Conv2Former',
        arch='t',
        out_indices=(3, ),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    cls_head=dict(in_channels=576),
    # mmaction2's decoders give RGB frames; Conv2Former's ImageNet statistics
    # (the values the ResNet recipe already uses)
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]))
