"""A multi-host TPU/GPU run: the 3D setting at pod scale, parameters and optimiser state sharded (FSDP).

Launch the same command on every host; ``jax.distributed.initialize()`` reads the cluster from the
environment (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)::

    python train.py --config=configs/pod.py --workdir=gs://bucket/medsam2/run1 \\
        --config.init_from=models/sam2.1_large --config.mesh.fsdp=8

``batch_size`` is global: each process reads ``batch_size / num_processes`` sequences (its grain shard).
"""

from configs import ct_3d


def get_config():
    c = ct_3d.get_config()
    c.model = "sam2.1_hiera_l"
    c.batch_size = 256
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.compute_dtype = "bfloat16"
    c.remat = True
    c.distributed = "on"
    c.checkpoint_every = 1000
    c.data.num_workers = 8
    c.data.cache_size = 8
    return c
