"""Packaging for mmconv2former.

Like OpenMMLab's ``.mim`` layout, ``configs/`` and ``tools/`` are installed
beside the package (as ``mmconv2former/.mim/``), so that a non-editable install
still carries them. mmengine resolves ``package::path`` config names only for
its fixed list of OpenMMLab packages, so ``mmconv2former::`` names do not
resolve; a user's config inherits ours by file path (see the README).
"""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    scope: dict = {}
    with open(osp.join(HERE, 'mmconv2former', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), scope)
    return scope['__version__']


def read_requirements(name: str) -> list:
    reqs = []
    with open(osp.join(HERE, 'requirements', name), encoding='utf-8') as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                reqs.append(line)
    return reqs


def add_mim_extension() -> None:
    """Copy configs/ and tools/ into mmconv2former/.mim for wheel builds.

    Editable installs (``pip install -e``) keep using the checkout directly, so
    nothing is copied for them.
    """
    mim_path = osp.join(HERE, 'mmconv2former', '.mim')
    if 'develop' in os.sys.argv or 'editable_wheel' in os.sys.argv:
        return
    os.makedirs(mim_path, exist_ok=True)
    for name in ('configs', 'tools'):
        dst = osp.join(mim_path, name)
        if osp.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(osp.join(HERE, name), dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='mmconv2former',
        version=read_version(),
        description='Conv2Former backbones for OpenMMLab 2.x '
        '(mmdet, mmsegmentation, mmpretrain)',
        long_description=open(osp.join(HERE, 'README.md'), encoding='utf-8').read()
        if osp.exists(osp.join(HERE, 'README.md')) else '',
        long_description_content_type='text/markdown',
        packages=find_packages(exclude=('configs', 'tools', 'tests', 'data', 'work_dirs')),
        include_package_data=True,
        package_data={'mmconv2former': ['.mim/configs/**/*', '.mim/tools/**/*']},
        python_requires='>=3.8',
        install_requires=read_requirements('runtime.txt'),
        extras_require={
            'mm': read_requirements('mminstall.txt'),
            'tests': read_requirements('tests.txt'),
            'deploy': read_requirements('deploy.txt'),
            # pip cannot say --no-deps / --no-binary for one requirement: the
            # supported install is tools/setup_env.sh (see requirements/pose.txt)
            'pose': [r for r in read_requirements('pose.txt') if not r.startswith('-')],
            'action': read_requirements('action.txt'),
        },
        license='Apache License 2.0',
        zip_safe=False,
    )
