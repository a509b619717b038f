"""Where this package's configs are, for a user's own config to inherit.

mmengine resolves ``package::path`` config names only for its fixed list of
OpenMMLab packages, so ``_base_ = 'mmconv2former::...'`` does not work. A
user's config inherits ours by file path instead; this module finds that path
in a checkout (``pip install -e .``) and in an installed copy (``pip install
.``, which puts ``configs/`` into ``mmconv2former/.mim/``)::

    python -m mmconv2former.config_files mask_rcnn/mask-rcnn_conv2former-t_fpn_1x_coco.py
"""
import os
import os.path as osp
import sys

_PACKAGE = osp.dirname(osp.abspath(__file__))


def configs_root() -> str:
    """The directory holding this package's ``configs/``."""
    for root in (osp.join(_PACKAGE, '.mim', 'configs'), osp.join(osp.dirname(_PACKAGE), 'configs')):
        if osp.isdir(root):
            return root
    raise FileNotFoundError(f'no configs/ directory beside {_PACKAGE}: reinstall mmconv2former '
                            'from a checkout (pip install -e . or pip install .)')


def config_path(name: str) -> str:
    """Absolute path of one of our configs, e.g. ``'upernet/upernet_conv2former-t_8xb2-amp-160k_ade20k-512x512.py'``."""
    root = configs_root()
    path = osp.join(root, name)
    if not osp.isfile(path):
        folder = osp.join(root, osp.dirname(name))
        known = sorted(f for f in os.listdir(folder) if f.endswith('.py')) if osp.isdir(folder) else []
        raise FileNotFoundError(f'no config {name!r} under {root}; '
                                + (f'{osp.dirname(name)}/ has {known}' if known else
                                   'see the folders there (mask_rcnn, upernet, conv2former, ...)'))
    return path


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit('usage: python -m mmconv2former.config_files FOLDER/CONFIG.py')
    print(config_path(sys.argv[1]))
