# Conv2Former-T on ImageNet-1k, the release's recipe (timm train.py defaults
# used by the authors' train.sh): 8 GPUs x 128 images, AdamW lr 1e-3 (= 1e-3 x
# 1024 / 1024), weight decay 0.05 (none on norms, biases, layer scales),
# 300 epochs cosine after 5 linear warm-up epochs from 1e-6, RandAugment
# m9-mstd0.5, Mixup 0.8, CutMix 1.0, label smoothing 0.1, random erasing 0.25,
# EMA of the weights. The other variants are deltas over this file.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='Conv2Former',
        arch='t',
        out_indices=(3, ),
        out_norm=False,  # the release's head normalises after its 1x1 conv instead
        drop_path_rate=0.2),
    # the release's head: 1x1 conv to 1280, GELU, LayerNorm, average pooling
    neck=dict(type='Conv2FormerNeck', in_channels=576),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=1280,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.0)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=5, end=300),
]

# timm's ModelEmaV2 with decay 0.9998 per step
custom_hooks = [dict(type='EMAHook', momentum=2e-4, priority='ABOVE_NORMAL')]

# 8 GPUs x 128 images per GPU
auto_scale_lr = dict(base_batch_size=1024)
