"""A user's own config inherits ours by file path (mmengine resolves
``package::`` names only for OpenMMLab's own packages)."""
import subprocess
import sys

import pytest
from mmengine.config import Config

from mmconv2former.config_files import config_path, configs_root


def test_a_user_config_inherits_ours_by_the_printed_path(tmp_path):
    name = 'mask_rcnn/mask-rcnn_conv2former-t_fpn_1x_coco.py'
    printed = subprocess.run([sys.executable, '-m', 'mmconv2former.config_files', name],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == config_path(name)
    user = tmp_path / 'my_mask_rcnn.py'
    user.write_text(f'_base_ = {printed!r}\nmodel = dict(backbone=dict(drop_path_rate=0.1))\n')
    cfg = Config.fromfile(str(user))
    assert cfg.model.backbone.type == 'Conv2Former'
    assert cfg.model.backbone.drop_path_rate == 0.1
    assert cfg.model.backbone.arch == 't'  # the rest comes from our config
    assert 'mmconv2former' in cfg.custom_imports['imports']


def test_an_unknown_config_names_what_the_folder_has():
    with pytest.raises(FileNotFoundError, match='mask-rcnn_conv2former-t_fpn_1x_coco.py'):
        config_path('mask_rcnn/nope.py')
    assert configs_root().endswith('configs')
