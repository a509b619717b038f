"""The mmpretrain classifier: the release's head, logit parity with release
weights, the ImageNet configs, the inferencer / test tool, and the demo."""
import functools
import glob
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, TINY, load_tool, randomise
from mmconv2former import Conv2Former
from mmconv2former.demo.imagefolder import generate_imagefolder_demo
from mmconv2former.models.classifier import Conv2FormerNeck, release_to_mm
from reference import ReferenceConv2Former

CONFIGS = osp.join(ROOT, 'configs', 'conv2former')
DEMO_CONFIG = osp.join(ROOT, 'configs', 'demo', 'conv2former-n_1xb32_shapes-demo.py')
VARIANT_CONFIGS = {'n': 'conv2former-n_8xb128_in1k.py', 't': 'conv2former-t_8xb128_in1k.py',
                   's': 'conv2former-s_8xb128_in1k.py', 'b': 'conv2former-b_8xb128_in1k.py',
                   'l': 'conv2former-l_8xb128_in1k.py',
                   'b_22k': 'conv2former-b_in22k-pre_8xb64_in1k-384px.py',  # B's 22k model: kernel 7
                   'l_384': 'conv2former-l_in22k-pre_8xb64_in1k-384px.py'}

converter = load_tool('model_converters/conv2former_to_mm.py')


def build_classifier(config: str, **backbone):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    cfg.model.backbone.update(backbone)
    cfg.model.setdefault('data_preprocessor', cfg.get('data_preprocessor'))  # as the Runner does
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model)


# ---------------------------------------------------------------- the neck
def test_neck_equals_release_head_and_pooling():
    ref = randomise(ReferenceConv2Former(**TINY)).eval()
    neck = Conv2FormerNeck(64)
    converted, _ = release_to_mm(ref.state_dict(), 'cls')
    neck.load_state_dict({k[len('neck.'):]: v for k, v in converted.items() if k.startswith('neck.')})
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        (ours, ) = neck((torch.randn(2, 48, 10, 14), x))  # only the last map is used
        theirs = ref.head(x).mean((-2, -1))
    assert ours.shape == (2, 1280)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(neck(x)[0], ours)  # a bare tensor works too


def test_neck_rejects_wrong_width_and_starts_like_release():
    neck = Conv2FormerNeck(512)
    with pytest.raises(ValueError, match='in_channels'):
        neck((torch.randn(1, 576, 7, 7), ))
    with pytest.raises(ValueError, match='positive'):
        Conv2FormerNeck(0)
    neck.init_weights()
    assert isinstance(neck.proj, nn.Conv2d) and isinstance(neck.norm, nn.LayerNorm)  # optimiser rules
    # the release's trunc_normal_(std=.02) (cut at +-2, i.e. 100 std)
    assert abs(float(neck.proj.weight.std()) - 0.02) < 1e-3 and neck.proj.bias.abs().max() == 0
    assert float(neck.norm.weight.mean()) == 1.0


def test_neck_is_found_by_mmpretrain_without_import():
    from mmpretrain.registry import MODELS
    assert MODELS.get('Conv2FormerNeck') is Conv2FormerNeck
    assert MODELS.get('mmconv2former.Conv2FormerNeck') is Conv2FormerNeck


def test_release_to_mm_renames_head_and_drops_it_for_dense_tasks():
    state = {'stages.0.0.layer_scale_1': torch.zeros(1), 'head.0.weight': torch.zeros(1),
             'head.2.bias': torch.zeros(1), 'pred.weight': torch.zeros(1)}
    cls, dropped = release_to_mm(state, 'cls')
    assert list(cls) == ['backbone.stages.0.0.layer_scale_1', 'neck.proj.weight', 'neck.norm.bias',
                         'head.fc.weight'] and dropped == []
    det, dropped = release_to_mm(state, 'det')
    assert list(det) == ['backbone.stages.0.0.layer_scale_1']
    assert dropped == ['head.0.weight', 'head.2.bias', 'pred.weight']
    with pytest.raises(ValueError):
        release_to_mm(state, 'pose')


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize('use_ema', [False, True])
def test_logits_equal_release_model(release_checkpoint, tmp_path, use_ema):
    """Release file -> converter -> the N config's classifier: same logits."""
    from mmengine.runner import load_checkpoint
    settings = Conv2Former.arch_settings['n']
    args = {k: settings[k] for k in ('channels', 'depths', 'kernel_size')}
    plain = randomise(ReferenceConv2Former(**args), seed=0).eval()
    ema = randomise(ReferenceConv2Former(**args), seed=1).eval()
    src = release_checkpoint(plain.state_dict(), ema.state_dict())
    dst = str(tmp_path / 'n_cls.pth')
    converter.main([src, dst, '--arch', 'n'] + (['--ema'] if use_ema else []))

    model = build_classifier(osp.join(CONFIGS, VARIANT_CONFIGS['n'])).eval()
    load_checkpoint(model, dst, map_location='cpu', strict=True, logger='silent')
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ours = model(x, mode='tensor')
        theirs = (ema if use_ema else plain)(x)
        other = (plain if use_ema else ema)(x)
    assert ours.shape == (2, 1000)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - other).abs().max() > 1e-2  # the right set of weights was picked

    if not use_ema:  # the ImageNet config's own pipeline (resize 256, crop 224) and class names
        from mmengine.registry import DefaultScope
        from mmpretrain.apis import ImageClassificationInferencer
        from mmpretrain.datasets import ImageNet
        image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
        # The inferencer builds its pipeline in the *current* default scope:
        # pin mmpretrain's rather than depend on whatever scope is current.
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            inferencer = ImageClassificationInferencer(osp.join(CONFIGS, VARIANT_CONFIGS['n']),
                                                       pretrained=dst, device='cpu')
            (result, ) = inferencer(image)
        assert result['pred_scores'].shape == (1000, )
        assert result['pred_class'] == ImageNet.METAINFO['classes'][result['pred_label']]


# ---------------------------------------------------------------- configs
@functools.lru_cache(maxsize=None)
def load_config(file: str):
    from mmengine.config import Config
    return Config.fromfile(osp.join(CONFIGS, file))


@pytest.mark.parametrize('name,file', list(VARIANT_CONFIGS.items()))
def test_variant_config_matches_its_arch_and_the_recipe(name, file):
    cfg = load_config(file)
    backbone, model = cfg.model.backbone, cfg.model
    arch = {'b_22k': 'b_22k', 'l_384': 'l'}.get(name, name)
    assert backbone.arch == arch, file
    assert backbone.out_indices == (3, ) and backbone.out_norm is False
    assert model.neck.in_channels == Conv2Former.arch_settings[arch]['channels'][-1], file
    assert model.head.in_channels == 1280 and model.head.num_classes == 1000
    assert model.head.loss == dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')
    assert cfg.custom_imports.imports == ['mmconv2former'] and cfg.default_scope == 'mmpretrain'
    optimizer = cfg.optim_wrapper.optimizer
    batch = 8 * cfg.train_dataloader.batch_size
    assert optimizer.type == 'AdamW' and cfg.auto_scale_lr.base_batch_size == batch
    pipeline = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
    assert pipeline['RandAugment']['magnitude_level'] == 9
    assert pipeline['RandAugment']['magnitude_std'] == 0.5
    assert pipeline['RandomErasing']['erase_prob'] == 0.25
    assert cfg.custom_hooks[0].type == 'EMAHook'
    if file.endswith('_in1k.py'):  # training from scratch: the release's recipe
        assert optimizer.lr == pytest.approx(1e-3 * batch / 1024) and optimizer.weight_decay == 0.05
        assert cfg.train_cfg.max_epochs == 300
        warmup, cosine = cfg.param_scheduler
        assert warmup.type == 'LinearLR' and warmup.end == 5 and cosine.begin == 5
        assert cosine.type == 'CosineAnnealingLR' and cosine.end == 300
        assert [a['type'] for a in model.train_cfg.augments] == ['Mixup', 'CutMix']
        assert [a['alpha'] for a in model.train_cfg.augments] == [0.8, 1.0]
        assert pipeline['RandomResizedCrop']['scale'] == 224
    else:  # 384 fine-tuning of the 22k models
        assert pipeline['RandomResizedCrop']['scale'] == 384
        assert cfg.test_dataloader.dataset.pipeline[1]['scale'] == 384
        assert cfg.train_cfg.max_epochs == 30 and cfg.load_from.startswith('checkpoints/')


def test_drop_path_grows_with_the_variant():
    drop_path = [load_config(VARIANT_CONFIGS[a]).model.backbone.drop_path_rate for a in 'ntsbl']
    assert drop_path == sorted(drop_path) and len(set(drop_path)) == 5  # grows with the model


def test_config_trains_a_step_with_mixup_and_cutmix():
    """The N recipe on tiny depths: batch augments, soft targets, label smoothing."""
    from mmpretrain.structures import DataSample
    # not TINY: the config's neck and head are sized for N's widths (512 channels out)
    model = build_classifier(osp.join(CONFIGS, VARIANT_CONFIGS['n']),
                             arch=dict(Conv2Former.arch_settings['n'], depths=[1, 1, 1, 1]))
    model.init_weights()
    model.train()
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(4)],
                data_samples=[DataSample().set_gt_label(i) for i in range(4)])
    data = model.data_preprocessor(data, training=True)
    assert data['data_samples'][0].gt_score.shape == (1000, )  # mixed, soft targets
    losses = model(**data, mode='loss')
    losses['loss'].backward()
    assert torch.isfinite(losses['loss'])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- inference tools
@pytest.fixture(scope='module')
def tiny_demo_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes_cls'))
    return generate_imagefolder_demo(root, num_train=6, num_val=6, size=(32, 32))


def test_inferencer_and_test_tool_give_the_release_model_predictions(release_checkpoint, tmp_path,
                                                                    tiny_demo_set):
    """A converted 3-class release file through mmpretrain's inferencer and tools/test.py."""
    from PIL import Image
    settings = Conv2Former.arch_settings['n']
    ref = randomise(ReferenceConv2Former(**{k: settings[k] for k in ('channels', 'depths', 'kernel_size')},
                                         num_classes=3)).eval()
    with torch.no_grad():  # spread the logits so that the argmax is well defined
        ref.pred.weight.mul_(20)
    dst = str(tmp_path / 'demo_cls.pth')
    converter.main([release_checkpoint(ref.state_dict()), dst])

    images = sorted(glob.glob(osp.join(tiny_demo_set, 'val', '*', '*.png')))
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB'))).permute(2, 0, 1).float()
                     for f in images])
    with torch.no_grad():
        probs = ref((x - mean) / std).softmax(-1)

    from mmpretrain.apis import ImageClassificationInferencer
    # a release file has no class names; ImageNet configs get them from the dataset
    inferencer = ImageClassificationInferencer(model=DEMO_CONFIG, pretrained=dst, device='cpu',
                                               classes=('circle', 'square', 'triangle'))
    results = inferencer(images, batch_size=len(images))
    scores = torch.tensor(np.stack([r['pred_scores'] for r in results]))
    torch.testing.assert_close(scores, probs, rtol=0, atol=1e-4)
    assert results[0]['pred_class'] in ('circle', 'square', 'triangle')

    test_tool = load_tool('test.py')
    metrics = test_tool.main([DEMO_CONFIG, dst, '--work-dir', str(tmp_path / 'test'), '--cfg-options',
                              f'test_dataloader.dataset.data_root={tiny_demo_set}'])
    labels = torch.tensor([('circle', 'square', 'triangle').index(osp.basename(osp.dirname(f)))
                           for f in images])
    expected = float((probs.argmax(-1) == labels).float().mean() * 100)
    assert metrics['accuracy/top1'] == pytest.approx(expected)


# ---------------------------------------------------------------- demo
def test_demo_set_is_balanced_deterministic_and_reused(tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    generate_imagefolder_demo(a, 9, 6, size=(32, 32))
    generate_imagefolder_demo(b, 9, 6, size=(32, 32))
    files = sorted(glob.glob(osp.join(a, '*', '*', '*.png')))
    per_class = [len(glob.glob(osp.join(a, 'train', c, '*.png'))) for c in ('circle', 'square', 'triangle')]
    assert per_class == [3, 3, 3]
    assert len(files) == 15
    for f in files:
        with open(f, 'rb') as fa, open(f.replace(a, b), 'rb') as fb:
            assert fa.read() == fb.read()
    stamp = osp.getmtime(files[0])
    generate_imagefolder_demo(a, 9, 6, size=(32, 32))  # in place: nothing rewritten
    assert osp.getmtime(files[0]) == stamp


def test_demo_runs_a_few_training_iterations(tmp_path, tiny_demo_set):
    demo = load_tool('demo/classification_demo.py')
    summary = demo.main(['--data-root', tiny_demo_set, '--work-dir', str(tmp_path / 'work'),
                         '--num-train', '6', '--num-val', '6', '--epochs', '2', '--num-predict', '2',
                         '--cfg-options', 'train_dataloader.batch_size=3'])
    assert summary['epochs'] == 2 and summary['train_images'] == 6 and summary['val_images'] == 6
    assert 0 <= summary['top1'] <= 100 and len(summary['predictions']) == 2
    assert osp.isfile(summary['checkpoint']) and osp.isfile(osp.join(str(tmp_path / 'work'), 'summary.json'))


@pytest.mark.slow
def test_demo_learns_well_above_chance(tmp_path):
    """A shorter run than the demo's default still beats chance (33 %) clearly."""
    demo = load_tool('demo/classification_demo.py')
    summary = demo.main(['--data-root', str(tmp_path / 'data'), '--work-dir', str(tmp_path / 'work'),
                         '--num-train', '600', '--num-val', '150', '--epochs', '20'])
    assert summary['top1'] >= 45.0  # measured: 61.3 after 20 epochs, 64.7 after the demo's 30
