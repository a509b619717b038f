# Top-down heatmap pose estimation (SimpleBaseline head) with Conv2Former-T on
# COCO keypoints, 256x192 crops: mmpose's ResNet-50 recipe (Adam lr 5e-4,
# 210 epochs, lr x0.1 at 170 and 200, 8 GPUs x 64 crops, MSRA heatmaps at
# stride 4, flip test) with the backbone swapped, as mmpose does for Swin-T
# (td-hm_swin-t-p4-w7_8xb32-210e_coco-256x192.py: same recipe, drop path 0.2).
# The head's three deconvolutions take the stride-32 map to the 64x48 heatmaps.
# Written with tools/misc/swap_backbone.py (--arch t) plus the pretrained weights.
_base_ = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_res50_8xb64-210e_coco-256x192.py'
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

# ImageNet-1k weights from the authors' release, converted with
# tools/model_converters/conv2former_to_mm.py (README: "Pretrained weights").
checkpoint = 'checkpoints/conv2former-t_in1k_backbone.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='Conv2Former',
        arch='t',
        out_indices=(3, ),
        drop_path_rate=0.2,  # mmpose's Swin-T rate
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    head=dict(in_channels=576),
    # Conv2Former was trained on RGB images with ImageNet's statistics (the
    # values mmpose's ResNet recipe already uses)
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True))
