# Conv2Former-N image classifier trained from scratch on the embedded demo set
# (one shape per 32x32 image: circle / square / triangle on a textured
# background; 600 training images) on a CPU in a few minutes.
#   python tools/demo/classification_demo.py   (generates data, trains, evaluates, predicts)
# The model is the release's classifier (backbone + 1280-wide head) with its
# initialisation; the recipe is the ImageNet one scaled down to 600 small
# images: AdamW with a 40-iteration warm-up and cosine decay; no Mixup /
# CutMix / RandAugment (too strong for so few, so small images) and no EMA
# (over 570 iterations the average lags behind the still improving model).
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['mmconv2former'], allow_failed_imports=False)

data_root = 'data/shapes_cls/'
metainfo = dict(classes=('circle', 'square', 'triangle'))

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='Conv2Former',
        arch='n',
        out_indices=(3, ),
        out_norm=False,
        drop_path_rate=0.0),
    neck=dict(type='Conv2FormerNeck', in_channels=512),
    head=dict(
        type='LinearClsHead',
        num_classes=3,
        in_channels=1280,
        loss=dict(type='CrossEntropyLoss'),
        topk=(1, ),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.0)))

data_preprocessor = dict(
    num_classes=3,
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 metainfo=metainfo, pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=50, num_workers=0, persistent_workers=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 metainfo=metainfo, pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

max_epochs = 30
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    # no weight decay on norms, biases and layer scales, as the release
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=40),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-5),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=1))
log_processor = dict(window_size=10)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
auto_scale_lr = dict(enable=False, base_batch_size=32)
