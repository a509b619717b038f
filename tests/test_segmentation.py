"""Segmentation: the ADE-format demo set, UperNet configs and models, the
tools end to end (train, test, multi-scale + flip test, mmseg's inferencer)."""
import glob
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from conftest import ROOT
from mmconv2former import Conv2Former
from mmconv2former.demo.ade import CLASSES, IGNORE, generate_ade_demo, label_map

pytest.importorskip('mmseg')

UPERNET_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'upernet', '*.py')))
DEMO_CONFIG = osp.join(ROOT, 'configs', 'demo', 'upernet_conv2former-n_demo.py')
SEG_CONFIGS = UPERNET_CONFIGS + [DEMO_CONFIG]
T_CONFIG = osp.join(ROOT, 'configs', 'upernet', 'upernet_conv2former-t_8xb2-amp-160k_ade20k-512x512.py')


def build_segmentor(cfg):
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg.model)


def read_png(path):
    from PIL import Image
    return np.array(Image.open(path))


# ----------------------------------------------------------------------------- demo set
@pytest.fixture(scope='module')
def tiny_ade(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('ade_demo'))
    return generate_ade_demo(root, num_train=8, num_val=4, seed=3)


def test_demo_set_has_ade_layout_and_labels(tiny_ade):
    for split, count in (('training', 8), ('validation', 4)):
        images = sorted(os.listdir(osp.join(tiny_ade, 'images', split)))
        labels = sorted(os.listdir(osp.join(tiny_ade, 'annotations', split)))
        assert images == [f'{i:06d}.jpg' for i in range(count)]
        assert labels == [f'{i:06d}.png' for i in range(count)]
    seg = np.stack([read_png(p) for p in glob.glob(osp.join(tiny_ade, 'annotations', '*', '*.png'))])
    assert seg.dtype == np.uint8 and seg.shape[1:] == (96, 96)
    # ADE: 0 unlabelled, classes 1..K; every class occurs in this small set
    assert set(np.unique(seg)) == set(range(len(CLASSES) + 1))


def test_demo_set_reads_with_reduce_zero_label(tiny_ade):
    """mmseg's own dataset and loader turn 0 into 255 and k into k - 1."""
    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = BaseSegDataset(data_root=tiny_ade, img_suffix='.jpg', seg_map_suffix='.png',
                                 data_prefix=dict(img_path='images/validation',
                                                  seg_map_path='annotations/validation'),
                                 metainfo=dict(classes=CLASSES), reduce_zero_label=True, pipeline=[])
    assert len(dataset) == 4
    info = dataset[0]
    raw = read_png(info['seg_map_path'])
    loaded = LoadAnnotations()(dict(info))['gt_seg_map']
    assert set(np.unique(loaded)) <= set(range(len(CLASSES))) | {255}
    np.testing.assert_array_equal(loaded == 255, raw == IGNORE)
    np.testing.assert_array_equal(loaded[raw > 0], raw[raw > 0] - 1)


def test_label_map_marks_outlines_unlabelled():
    classes = np.zeros((8, 8), dtype=np.int64)
    classes[2:6, 2:6] = 2  # a square of class 2 (stored as 3) on class 0 (stored as 1)
    seg = label_map(classes, border=1)
    assert seg[0, 0] == 1 and seg[3, 3] == 3 and seg[3, 4] == 3
    # the pixels on either side of the outline (4-neighbourhood: not the outer corners)
    ring = np.zeros((8, 8), dtype=bool)
    ring[1:7, 1:7] = True
    ring[3:5, 3:5] = False
    ring[[1, 1, 6, 6], [1, 6, 1, 6]] = False
    assert (seg[ring] == IGNORE).all() and (seg[~ring] != IGNORE).all()
    np.testing.assert_array_equal(label_map(classes, border=0), classes + 1)
    assert (label_map(classes, border=2) == IGNORE).sum() > ring.sum()


def test_materials_differ_in_texture_not_in_colour():
    """The class is in the pattern: grain energy orders the materials as their
    names say, while the mean colours of the classes overlap."""
    from mmconv2former.demo.materials import MATERIALS, render_material
    rng = np.random.default_rng(0)
    energy, brightness = {}, {}
    for kind in MATERIALS:
        images = [render_material(kind, rng, 48, 48) for _ in range(20)]
        # mean absolute difference of horizontally neighbouring pixels
        energy[kind] = np.mean([np.abs(np.diff(im, axis=1)).mean() for im in images])
        brightness[kind] = [im.mean() for im in images]
    assert energy['smooth'] < 8 < min(energy[k] for k in MATERIALS if k != 'smooth')
    assert energy['speckle'] > max(energy[k] for k in ('stripes', 'checks', 'dots'))
    for kind, values in brightness.items():  # every material spans dark and bright
        assert min(values) < 110 and max(values) > 140, (kind, values)
    with pytest.raises(ValueError, match='unknown material'):
        render_material('marble', rng, 8, 8)


def test_demo_set_is_deterministic_and_idempotent(tmp_path):
    a = generate_ade_demo(str(tmp_path / 'a'), num_train=3, num_val=2)
    b = generate_ade_demo(str(tmp_path / 'b'), num_train=3, num_val=2)
    files = sorted(osp.relpath(p, a) for p in glob.glob(osp.join(a, '**', '*.*'), recursive=True))
    assert len(files) == 11  # 5 images, 5 label maps, the settings stamp
    for rel in files:
        with open(osp.join(a, rel), 'rb') as fa, open(osp.join(b, rel), 'rb') as fb:
            assert fa.read() == fb.read(), rel
    stamp = osp.getmtime(osp.join(a, 'images', 'training', '000000.jpg'))
    os.utime(osp.join(a, 'images', 'training', '000000.jpg'), (stamp - 100, stamp - 100))
    generate_ade_demo(a, num_train=3, num_val=2)  # same settings: nothing rewritten
    assert osp.getmtime(osp.join(a, 'images', 'training', '000000.jpg')) == stamp - 100
    generate_ade_demo(a, num_train=2, num_val=2)  # smaller set: no stale files left behind
    assert sorted(os.listdir(osp.join(a, 'images', 'training'))) == ['000000.jpg', '000001.jpg']
    assert len(os.listdir(osp.join(a, 'annotations', 'training'))) == 2


# ----------------------------------------------------------------------------- configs
def test_all_segmentation_configs_are_found():
    names = {osp.basename(p) for p in UPERNET_CONFIGS}
    assert names == {f'upernet_conv2former-{s}_8xb2-amp-160k_ade20k-512x512.py' for s in 'tsb'} | {
        'upernet_conv2former-l_8xb2-amp-160k_ade20k-640x640.py'}


@pytest.mark.parametrize('path', UPERNET_CONFIGS, ids=osp.basename)
def test_config_keeps_the_ade20k_recipe(path):
    """The issue's recipe, read from the config as written (before CPU adaptation)."""
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmseg'
    crop = (640, 640) if '640x640' in path else (512, 512)
    assert tuple(cfg.crop_size) == crop and tuple(cfg.model.data_preprocessor.size) == crop
    backbone = cfg.model.backbone
    assert backbone.type == 'Conv2Former'
    assert backbone.init_cfg.type == 'Pretrained' and backbone.init_cfg.prefix == 'backbone.'
    assert ('in22k' in backbone.init_cfg.checkpoint) == (backbone.arch == 'l')
    channels = Conv2Former.arch_settings[backbone.arch]['channels']
    assert list(cfg.model.decode_head.in_channels) == channels
    assert cfg.model.decode_head.type == 'UPerHead' and cfg.model.decode_head.num_classes == 150
    aux = cfg.model.auxiliary_head  # FCN on stage 3
    assert aux.type == 'FCNHead' and aux.in_index == 2 and aux.in_channels == channels[2]
    assert cfg.model.test_cfg.mode == 'slide' and tuple(cfg.model.test_cfg.crop_size) == crop
    wrapper = cfg.optim_wrapper
    assert wrapper.type == 'AmpOptimWrapper'
    assert wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
    assert dict(wrapper.paramwise_cfg) == dict(decay_rate=0.9, decay_type='stage_wise')
    assert wrapper.optimizer.type == 'AdamW'
    assert (wrapper.optimizer.lr, wrapper.optimizer.weight_decay) == (1e-4, 0.05)
    warmup, poly = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and (warmup.begin, warmup.end) == (0, 1500)
    assert poly.type == 'PolyLR' and (poly.begin, poly.end) == (1500, 160000)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2
    assert 'SyncBN' in cfg.pretty_text  # the GPU recipe; tools adapt it on CPU
    assert 'tta_pipeline' in cfg and cfg.tta_model.type == 'SegTTAModel'


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=osp.basename)
def test_config_builds_on_cpu(path):
    from mmconv2former.engine.runtime import load_config
    cfg = load_config(path)
    if not torch.cuda.is_available():  # SyncBN -> BN, AMP -> fp32 without --cfg-options
        assert 'SyncBN' not in cfg.pretty_text and cfg.optim_wrapper.type == 'OptimWrapper'
    model = build_segmentor(cfg)
    assert isinstance(model.backbone, Conv2Former)
    assert list(model.decode_head.in_channels) == list(model.backbone.out_channels)


def test_conv2former_t_upernet_has_about_56m_parameters():
    """The paper reports 56M for Conv2Former-T UperNet (ConvNeXt-T: 60M)."""
    model = build_segmentor(Config.fromfile(T_CONFIG))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 56e6) < 1e6, count


def test_stage_wise_lr_decay_on_upernet():
    from mmengine.optim import build_optim_wrapper
    from mmconv2former.engine.runtime import load_config
    cfg = load_config(T_CONFIG)
    model = build_segmentor(cfg)
    with DefaultScope.overwrite_default_scope('mmseg'):  # as mmseg's runner builds it
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr = {name: group['lr'] for group in wrapper.optimizer.param_groups for name in group['param_names']}
    assert len(lr) == sum(p.requires_grad for p in model.parameters())
    # stage-wise, as the backbone counts: stem 0, stage i (with its downsampling) i + 1,
    # heads 6, of 7 -> lr x 0.9 ** (6 - id)
    assert lr['backbone.downsample_layers.0.0.weight'] == pytest.approx(1e-4 * 0.9 ** 6)
    assert lr['backbone.stages.0.0.mlp.fc1.weight'] == pytest.approx(1e-4 * 0.9 ** 5)
    assert lr['backbone.downsample_layers.2.1.weight'] == pytest.approx(1e-4 * 0.9 ** 3)
    assert lr['backbone.stages.2.0.mlp.fc1.weight'] == lr['backbone.stages.2.11.mlp.fc1.weight']
    assert lr['backbone.stages.3.2.mlp.fc1.weight'] == pytest.approx(1e-4 * 0.9 ** 2)
    assert lr['decode_head.conv_seg.weight'] == pytest.approx(1e-4)
    assert lr['auxiliary_head.conv_seg.weight'] == pytest.approx(1e-4)


def test_upernet_forward_backward_on_cpu():
    from mmconv2former.engine.runtime import adapt_to_device
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    cfg = Config.fromfile(T_CONFIG)
    cfg.model.backbone.init_cfg = None
    adapt_to_device(cfg)
    model = build_segmentor(cfg)
    model.init_weights()
    model.train()
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64), ori_shape=(64, 64)))
        gt = torch.randint(0, 150, (1, 64, 64))
        gt[:, :4] = 255  # ignored pixels, as ADE's reduced zero label
        sample.gt_sem_seg = PixelData(data=gt)
        samples.append(sample)
    losses = model(torch.randn(2, 3, 64, 64), samples, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and 'aux.loss_ce' in log_vars
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.backbone.stages[2][-1].mlp.fc2.weight.grad.abs().sum() > 0  # aux head's stage
    model.eval()
    with torch.no_grad():  # sliding-window inference on an input smaller than the window
        results = model(torch.randn(1, 3, 64, 80), [SegDataSample(metainfo=dict(
            img_shape=(64, 80), pad_shape=(64, 80), ori_shape=(64, 80)))], mode='predict')
    assert results[0].pred_sem_seg.data.shape == (1, 64, 80)


# ----------------------------------------------------------------------------- tools end to end
def _data_options(root):
    root = root.rstrip('/') + '/'
    return [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')]


def test_train_test_tta_and_inferencer_end_to_end(tiny_ade, tmp_path, monkeypatch):
    import tools.test as test_tool
    import tools.train as train_tool
    work_dir = str(tmp_path / 'work')
    train_tool.main([DEMO_CONFIG, '--work-dir', work_dir, '--cfg-options', *_data_options(tiny_ade),
                     'train_dataloader.batch_size=2', 'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
                     'param_scheduler.0.end=2', 'param_scheduler.1.begin=2', 'param_scheduler.1.end=4',
                     'default_hooks.checkpoint.interval=4'])
    checkpoint = osp.join(work_dir, 'iter_4.pth')
    assert osp.isfile(checkpoint)

    options = ['--cfg-options', *_data_options(tiny_ade)]
    show_dir = str(tmp_path / 'show')
    # mmseg's hook draws every `interval`-th batch (50 by default). The runner
    # gets a visualizer of its own although training built one in this process.
    metrics = test_tool.main([DEMO_CONFIG, checkpoint, '--work-dir', str(tmp_path / 'eval'),
                              '--show-dir', show_dir, *options, 'default_hooks.visualization.interval=1'])
    assert 0.0 <= metrics['mIoU'] <= 100.0
    drawn = [p for p in glob.glob(osp.join(show_dir, '**', '*'), recursive=True) if p.endswith(('.png', '.jpg'))]
    assert len(drawn) == 4, drawn

    # the folded inference form (switch_to_deploy after loading) scores the same
    from mmconv2former.engine import SwitchToDeployHook
    switched = []
    before_test = SwitchToDeployHook.before_test
    monkeypatch.setattr(SwitchToDeployHook, 'before_test',
                        lambda hook, runner: (before_test(hook, runner), switched.append(runner.model))[0])
    deployed = test_tool.main([DEMO_CONFIG, checkpoint, '--switch-to-deploy',
                               '--work-dir', str(tmp_path / 'deploy'), *options])
    assert len(switched) == 1 and switched[0].backbone.deployed
    assert abs(deployed['mIoU'] - metrics['mIoU']) <= 0.1, (deployed, metrics)

    # multi-scale + flip through mmseg's SegTTAModel and the config's tta_pipeline
    tta = test_tool.main([DEMO_CONFIG, checkpoint, '--tta', '--work-dir', str(tmp_path / 'tta'), *options])
    assert 0.0 <= tta['mIoU'] <= 100.0

    # mmseg's own inferencer with our config and checkpoint, one image
    from mmseg.apis import MMSegInferencer
    inferencer = MMSegInferencer(model=DEMO_CONFIG, weights=checkpoint, device='cpu')
    image = osp.join(tiny_ade, 'images', 'validation', '000000.jpg')
    out = inferencer(image, out_dir=str(tmp_path / 'vis'))
    assert out['predictions'].shape == (96, 96)
    assert set(np.unique(out['predictions'])) <= set(range(len(CLASSES)))
    assert osp.isfile(osp.join(tmp_path, 'vis', 'vis', '000000.jpg'))


def test_t_config_trains_on_cpu_with_cfg_options_only(tiny_ade, tmp_path):
    """The full ADE20K config, unedited: only --cfg-options (data, no pretrained file,
    small crops, two iterations); SyncBN and AMP are adapted by the tool."""
    import tools.train as train_tool
    crop = '(128,128)'
    train_tool.main([T_CONFIG, '--work-dir', str(tmp_path), '--cfg-options', *_data_options(tiny_ade),
                     'model.backbone.init_cfg=None', f'model.data_preprocessor.size={crop}',
                     'train_dataloader.dataset.pipeline.2.scale=(512,128)',
                     f'train_dataloader.dataset.pipeline.3.crop_size={crop}',
                     'val_dataloader.dataset.pipeline.1.scale=(512,128)',
                     f'model.test_cfg.crop_size={crop}', 'model.test_cfg.stride=(85,85)',
                     'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
                     'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
                     'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                     'default_hooks.checkpoint.interval=2'])
    assert osp.isfile(osp.join(tmp_path, 'iter_2.pth'))


def majority_class_scores(root: str) -> tuple:
    """(aAcc, mIoU) of predicting the validation split's most frequent class everywhere."""
    counts = np.zeros(256, dtype=np.int64)
    for path in glob.glob(osp.join(root, 'annotations', 'validation', '*.png')):
        counts += np.bincount(read_png(path).ravel(), minlength=256)
    scored = counts[1:len(CLASSES) + 1]
    majority = scored.max() / scored.sum()
    return 100 * majority, 100 * majority / len(CLASSES)


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """A 200-iteration run (a quarter of the demo) must already tell materials
    apart: far above predicting the most frequent class everywhere (aAcc 24.6,
    mIoU 4.9 on the default set; measured 37.5 mIoU, aAcc 51.3). The full 800
    iterations reach 70.6 mIoU (docs/performance.md)."""
    from tools.demo.segmentation_demo import main
    summary = main(['--work-dir', str(tmp_path / 'work'), '--data-root', str(tmp_path / 'data'),
                    '--iters', '200', '--num-vis', '2'])
    chance_aacc, chance_miou = majority_class_scores(str(tmp_path / 'data'))
    assert summary['mIoU'] >= max(20.0, chance_miou + 14.0), (summary, chance_miou)
    assert summary['aAcc'] >= chance_aacc + 10.0, (summary, chance_aacc)
    # the demo's per-class pass (mmseg's inferencer) agrees with the runner's IoUMetric
    per_class = summary['per_class_iou']
    assert list(per_class) == list(CLASSES)
    assert abs(np.mean(list(per_class.values())) - summary['mIoU']) < 0.05, summary
    assert osp.isfile(summary['curves'])
    assert len(os.listdir(summary['predictions'])) == 2
