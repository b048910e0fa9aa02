"""2D image sets (the paper's one-prompt setting): sequences of independent 2D images of one task, the
first prompted, the rest segmented from memory. Point ``--config.data.dataset_dirs`` at 2D datasets
(PNG/NIfTI 2D images with labels, as medsam2_jax.data.io.read_dataset lists them)."""

from configs import base


def get_config():
    c = base.get_config()
    c.image_size = 1024
    c.num_frames = 8
    c.batch_size = 8
    c.compute_dtype = "bfloat16"
    c.bank.policy = "self_sorting"
    c.data.max_correct_frames = 2
    c.data.num_workers = 4
    return c
