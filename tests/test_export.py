"""ONNX export (mmconv2former.export, tools/deployment/export_onnx.py): one
model of each kind exported and run in onnxruntime against PyTorch, dynamic
sizes (multiples of 32 and not), the errors for what cannot be exported, and
the segmentation demo's model end to end. Skipped without the deploy extras
(requirements/deploy.txt)."""
import copy
import importlib.util
import os.path as osp

import pytest
import torch

from conftest import ROOT, TINY, randomise

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from mmconv2former.export import (ExportError, ExportSpec, build_spec,  # noqa: E402
                                  export_onnx, load_images, load_model, verify)

_spec = importlib.util.spec_from_file_location(
    'export_onnx', osp.join(ROOT, 'tools', 'deployment', 'export_onnx.py'))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

DEMO = osp.join(ROOT, 'configs', 'demo')
CLS_CONFIG = osp.join(DEMO, 'conv2former-n_1xb32_shapes-demo.py')
SEG_CONFIG = osp.join(DEMO, 'upernet_conv2former-n_demo.py')
MASK_RCNN_CONFIG = osp.join(DEMO, 'mask-rcnn_conv2former-n_fpn_demo.py')
RETINANET_CONFIG = osp.join(ROOT, 'configs', 'retinanet', 'retinanet_conv2former-t_fpn_1x_coco.py')
CHANNELS = TINY['channels']


# Small versions of each config: the tiny arch, heads sized to it. Functions,
# because mmengine's merge pops `_delete_` out of the dicts it is given.
def tiny() -> dict:
    return dict(_delete_=True, **TINY)


def cls_options() -> dict:
    return {'model.backbone.arch': tiny(), 'model.neck.in_channels': CHANNELS[3]}


def seg_options() -> dict:
    return {'model.backbone.arch': tiny(), 'model.decode_head.in_channels': CHANNELS,
            'model.decode_head.channels': 16, 'model.auxiliary_head.in_channels': CHANNELS[2],
            'model.auxiliary_head.channels': 16}


def mask_rcnn_options() -> dict:
    return {'model.backbone.arch': tiny(), 'model.neck.in_channels': CHANNELS,
            'model.neck.out_channels': 32, 'model.rpn_head.in_channels': 32,
            'model.rpn_head.feat_channels': 32}


def retinanet_options() -> dict:
    return {'model.backbone.arch': tiny(), 'model.backbone.init_cfg': None,
            'model.neck.in_channels': CHANNELS[1:], 'model.neck.out_channels': 32,
            'model.bbox_head.in_channels': 32, 'model.bbox_head.feat_channels': 32,
            'model.bbox_head.num_classes': 3}


def save_checkpoint(config: str, options: dict, path: str, seed: int = 0) -> str:
    """A checkpoint of the freshly initialised model, as a trained one is laid
    out; the backbone's weights random throughout, so that every block (not
    only the 1e-6 layer scales' near-identity) reaches the outputs compared."""
    from mmengine.registry import DefaultScope

    from mmconv2former.engine.runtime import detect_library, library_models, load_config
    cfg = load_config(config, copy.deepcopy(options))
    library = detect_library(cfg)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(library):
        model = library_models(library).build(cfg.model)
    model.init_weights()
    randomise(model.backbone, seed)
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': {'classes': ('a', 'b', 'c')}}}, path)
    return path


def export_and_verify(tmp_path, config, options, shape=(64, 64), dynamic=False, features=False,
                      images=(), switch_to_deploy=False):
    checkpoint = save_checkpoint(config, options, str(tmp_path / 'model.pth'))
    model, cfg, library = load_model(config, checkpoint, options)
    spec = build_spec(model, library, features=features, switch_to_deploy=switch_to_deploy)
    path = export_onnx(spec, str(tmp_path / 'model.onnx'), shape, dynamic=dynamic)
    real = [(p, im) for p, im in zip(images, load_images(cfg, library, images))]
    report = verify(path, spec, real, shape, dynamic, repeat=1)
    assert not report.failures, '\n'.join(report.lines())
    return spec, report


def outputs_of(path):
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return [o.name for o in session.get_outputs()], session


# ----------------------------------------------------------------------------- one of each kind
def test_classifier_exports_logits_equal_to_pytorch(tmp_path):
    image = tool.generated_image((64, 64), str(tmp_path))
    spec, report = export_and_verify(tmp_path, CLS_CONFIG, cls_options(), images=[image])
    assert spec.kind == 'classifier' and spec.output_names == ['logits']
    names, session = outputs_of(str(tmp_path / 'model.onnx'))
    assert names == ['logits'] and session.get_inputs()[0].shape == [1, 3, 64, 64]  # static
    assert report.max_rel_diff < 1e-4
    assert all(c.label_agreement == 100.0 for c in report.comparisons)  # same top-1


def test_backbone_in_deploy_form_exports_the_same_numbers(tmp_path):
    """--switch-to-deploy folds the backbone of the graph's copy; verify
    compares with the original model, which stays trainable."""
    spec, report = export_and_verify(tmp_path, CLS_CONFIG, cls_options(), dynamic=True,
                                     switch_to_deploy=True)
    assert spec.module.model.backbone.deployed
    assert report.max_rel_diff < 1e-4


def test_segmentor_dynamic_sizes_multiple_of_32_and_not(tmp_path):
    spec, report = export_and_verify(tmp_path, SEG_CONFIG, seg_options(), dynamic=True)
    assert spec.output_names == ['seg_logits', 'seg_labels']
    shapes = [c.shape for c in report.comparisons]
    assert (1, 3, 64, 64) in shapes and (2, 3, 96, 128) in shapes and (1, 3, 109, 103) in shapes
    for c in report.comparisons:
        assert c.max_rel_diff < 1e-4 and c.label_agreement >= 99.9, c
    _, session = outputs_of(str(tmp_path / 'model.onnx'))
    logits, labels = session.run(None, {'images': torch.rand(1, 3, 45, 77).numpy() * 255})
    assert logits.shape == (1, 5, 45, 77) and labels.shape == (1, 45, 77)  # at the input size


def test_segmentor_padding_in_the_graph_is_cropped_off(tmp_path):
    """A test-time size_divisor pads inside the graph; outputs keep the input size."""
    options = {**seg_options(), 'model.data_preprocessor.test_cfg': dict(size_divisor=32)}
    spec, report = export_and_verify(tmp_path, SEG_CONFIG, options, shape=(70, 45), dynamic=True)
    assert spec.module.preprocess.pads
    assert all(c.max_rel_diff < 1e-4 for c in report.comparisons)


def test_two_stage_detector_exports_features_and_says_why_not_more(tmp_path):
    checkpoint = save_checkpoint(MASK_RCNN_CONFIG, mask_rcnn_options(), str(tmp_path / 'm.pth'))
    model, cfg, library = load_model(MASK_RCNN_CONFIG, checkpoint, mask_rcnn_options())
    with pytest.raises(ExportError, match='two-stage.*NMS.*--features'):
        build_spec(model, library)
    spec, report = export_and_verify(tmp_path, MASK_RCNN_CONFIG, mask_rcnn_options(),
                                     shape=(64, 96), dynamic=True, features=True)
    assert spec.output_names == [f'feat_{i}' for i in range(5)]  # FPN P2..P6
    assert report.max_rel_diff < 1e-4


def test_single_stage_detector_exports_raw_head_outputs(tmp_path):
    spec, report = export_and_verify(tmp_path, RETINANET_CONFIG, retinanet_options(),
                                     shape=(64, 96), dynamic=True)
    assert spec.output_names == [f'cls_score_{i}' for i in range(5)] + \
        [f'bbox_pred_{i}' for i in range(5)]
    _, session = outputs_of(str(tmp_path / 'model.onnx'))
    outs = session.run(None, {'images': torch.rand(1, 3, 100, 130).numpy() * 255})
    # 9 anchors x 3 classes / 9 x 4 deltas per location; the input is padded to 128x160
    assert outs[0].shape == (1, 27, 16, 20) and outs[5].shape == (1, 36, 16, 20)
    assert report.max_rel_diff < 1e-4


# ----------------------------------------------------------------------------- errors
def test_unknown_model_type_is_refused_with_what_is_supported(tmp_path):
    checkpoint = save_checkpoint(CLS_CONFIG, cls_options(), str(tmp_path / 'c.pth'))
    model, _, _ = load_model(CLS_CONFIG, checkpoint, cls_options())
    with pytest.raises(ExportError, match='not a model type this exporter knows.*Supported'):
        build_spec(model, 'mmseg')  # a classifier where a segmentor is expected
    model.data_preprocessor = torch.nn.Identity()
    with pytest.raises(ExportError, match='unsupported data preprocessor Identity'):
        build_spec(model, 'mmpretrain')


def test_backbone_only_checkpoint_is_refused(tmp_path):
    from mmconv2former import Conv2Former
    path = str(tmp_path / 'backbone.pth')
    torch.save({'state_dict': {'backbone.' + k: v for k, v in
                               Conv2Former(arch=TINY).state_dict().items()}}, path)
    with pytest.raises(ExportError, match='(?s)does not match.*whole model'):
        load_model(CLS_CONFIG, path, cls_options())


def test_cli_never_overwrites_without_force(tmp_path, capsys):
    output = tmp_path / 'model.onnx'
    output.write_bytes(b'keep me')
    with pytest.raises(SystemExit, match='exists; pass --force'):
        tool.main([CLS_CONFIG, str(tmp_path / 'none.pth'), '-o', str(output)])
    assert output.read_bytes() == b'keep me'


def test_cli_export_and_verify(tmp_path, capsys):
    """The tool end to end: --force replaces a file, --verify prints the numbers."""
    checkpoint = save_checkpoint(CLS_CONFIG, cls_options(), str(tmp_path / 'c.pth'))
    output = tmp_path / 'c.onnx'
    output.write_bytes(b'old')
    config = tmp_path / 'tiny_classifier.py'
    config.write_text(f'_base_ = [{CLS_CONFIG!r}]\n'
                      f'model = dict(backbone=dict(arch=dict(_delete_=True, **{TINY!r})),\n'
                      f'             neck=dict(in_channels={CHANNELS[3]}))\n')
    rc = tool.main([str(config), checkpoint, '-o', str(output), '--shape', '64', '64', '--force',
                    '--verify', '--repeat', '1'])
    out = capsys.readouterr().out
    assert rc == 0 and output.stat().st_size > 1000
    assert 'max rel diff' in out and 'onnxruntime' in out and 'PyTorch' in out and ': ok' in out
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert meta['mmconv2former.kind'] == 'classifier' and '"a"' in meta['mmconv2former.classes']


def test_exporter_failure_is_reported_with_what_to_try(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, images):
            raise RuntimeError('no symbolic for this op')

    spec = ExportSpec('features', Unexportable(), ['feat_0'], lambda images: [],
                          'a graph that cannot be traced')
    path = tmp_path / 'bad.onnx'
    with pytest.raises(ExportError, match='(?s)could not export.*no symbolic.*--exporter dynamo'):
        export_onnx(spec, str(path), (64, 64))
    assert not path.exists() and not (tmp_path / 'bad.onnx.part').exists()


@pytest.mark.slow
def test_segmentation_demo_export_matches_pytorch_on_its_validation_images(tmp_path, capsys):
    """The demo as a user runs it (a short training), then the tool on its
    config and checkpoint: every validation image's labels as PyTorch's."""
    spec = importlib.util.spec_from_file_location(
        'segmentation_demo', osp.join(ROOT, 'tools', 'demo', 'segmentation_demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    data_root = str(tmp_path / 'ade_demo')
    summary = demo.main(['--iters', '20', '--num-train', '16', '--num-val', '80', '--num-vis', '1',
                         '--work-dir', str(tmp_path / 'work'), '--data-root', data_root])
    output = str(tmp_path / 'demo.onnx')
    rc = tool.main([SEG_CONFIG, summary['checkpoint'], '-o', output, '--dynamic', '--verify',
                    '--image', osp.join(data_root, 'images', 'validation'), '--repeat', '3'])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith('80 real images'))
    pooled = float(line.split('% (worst image), ')[1].split('%')[0])
    assert pooled >= 99.9, line


def test_cli_names_the_missing_extras(tmp_path, monkeypatch):
    monkeypatch.setattr(tool, '_missing', lambda module: module == 'onnxruntime')
    with pytest.raises(SystemExit, match=r'onnxruntime not installed.*requirements/deploy\.txt'):
        tool.main([CLS_CONFIG, str(tmp_path / 'c.pth'), '-o', str(tmp_path / 'c.onnx'), '--verify'])
