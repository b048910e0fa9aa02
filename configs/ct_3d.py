"""The paper's 3D setting: 8-slice sequences from CT volumes at 1024 px with the self-sorting memory bank.

Point ``--config.data.dataset_dirs`` at MSD-style CT folders (``imagesTr/``, ``labelsTr/``) and
``--config.init_from`` at a converted SAM 2.1 checkpoint, e.g.::

    python train.py --config=configs/ct_3d.py --workdir=runs/ct3d \\
        --config.init_from=models/sam2.1_tiny --config.data.dataset_dirs='("/data/Task03_Liver",)'
"""

from configs import base


def get_config():
    c = base.get_config()
    c.image_size = 1024
    c.num_frames = 8
    c.batch_size = 8
    c.total_steps = 20000
    c.compute_dtype = "bfloat16"
    c.remat = True
    c.bank.policy = "self_sorting"
    c.data.num_workers = 4
    return c
