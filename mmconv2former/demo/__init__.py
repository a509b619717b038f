"""The embedded demos: generators of their synthetic data sets and the helpers
that train, evaluate and plot them (``tools/demo/*.py``).

These are not datasets: nothing here is registered with a library. Each
generator writes files in a format the library's own dataset class already
reads (COCO for mmdet's ``CocoDataset``, ADEChallengeData2016 for mmseg, an
image folder for mmpretrain's ``CustomDataset``), so the demo configs use the
stock datasets and pipelines.

    shapes.py       scenes of coloured shapes on textured backgrounds
    materials.py    scenes of texture regions ("stuff") for segmentation
    coco.py         the COCO-format instance-segmentation demo set (shapes)
    ade.py          the ADE20K-format semantic-segmentation demo set (materials)
    imagefolder.py  the image-classification demo set (one shape per image)
    runner.py       train and test a demo config through tools/train.py's machinery
    curves.py       training curves from mmengine's logs as a PNG

Each generator also runs as ``python -m mmconv2former.demo.<name> [root]``.
"""
