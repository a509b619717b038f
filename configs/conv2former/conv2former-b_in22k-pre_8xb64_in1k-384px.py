# Fine-tune the release's ImageNet-22k pre-trained Conv2Former-B (its 1k
# classifier, kernel-7 variant 'b_22k') at 384x384 on ImageNet-1k.
# The release publishes no fine-tuning recipe; this one is ConvNeXt's for
# 22k -> 1k at 384: 30 epochs, AdamW lr 5e-5 for 512 images, weight decay
# 1e-8, no warm-up, no Mixup / CutMix, EMA; RandAugment, random erasing and
# label smoothing as in pre-training. Also the test config of converted
# 384 checkpoints (tools/test.py CONFIG CHECKPOINT).
_base_ = './conv2former-b_8xb128_in1k.py'

# tools/model_converters/conv2former_to_mm.py <release B-22k file> <this path> (--for cls)
load_from = 'checkpoints/conv2former-b_in22k-pre_in1k.pth'

model = dict(backbone=dict(arch='b_22k', drop_path_rate=0.2), train_cfg=None)

bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(type='RandomErasing', erase_prob=0.25, mode='rand', min_area_ratio=0.02,
         max_area_ratio=1 / 3, fill_color=bgr_mean, fill_std=bgr_std),
    dict(type='PackInputs'),
]
# whole image resized to 384x384 (crop ratio 1.0), as ConvNeXt evaluates at 384
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=64, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=64, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=5e-5, weight_decay=1e-8))
param_scheduler = [dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=0, end=30)]
train_cfg = dict(max_epochs=30)

# 8 GPUs x 64 images per GPU
auto_scale_lr = dict(base_batch_size=512)
