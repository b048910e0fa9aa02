"""A CPU-sized run that trains in minutes: 256 px, 4 frames, SAM 2's FIFO memory, phantoms (+ the real CT)."""

from configs import base


def get_config():
    c = base.get_config()
    c.image_size = 256
    c.num_frames = 4
    c.batch_size = 2
    c.total_steps = 40
    c.lr = 1e-4
    c.warmup_steps = 5
    c.log_every = 2
    c.checkpoint_every = 20
    c.bank.policy = "fifo"
    c.dropout = False
    c.data.phantoms = 3
    c.data.phantom_shape = (96, 96, 32)
    c.data.realct = True
    c.data.realct_structures = ("liver", "heart")
    c.eval.phantoms = 2
    c.eval.batches = 4
    return c
