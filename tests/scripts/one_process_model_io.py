"""One process of a two-process ``jax.distributed`` program (127.0.0.1, gloo) in which process 0 alone saves
and loads a model directory while process 1 never calls either; both then meet at a final barrier.

    python tests/scripts/one_process_model_io.py PROCESS_ID PORT MODEL_DIR RESULT_FILE

``api.save_model`` and ``api.load_model`` must not wait for the other process (orbax synchronises every
process around a checkpoint by default), or process 0 never reaches the final barrier. Process 0 writes
``RESULT_FILE`` (one line: ``ok`` and whether the loaded weights equal the saved ones bit for bit).
"""

import sys

import jax
import numpy as np

pid, port, model_dir, result = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=300)

from jax.experimental import multihost_utils  # noqa: E402

from medsam2_jax import api  # noqa: E402
from medsam2_jax.interop import weights  # noqa: E402

if pid == 0:
    model = api.random_model("sam2.1_hiera_t", 64, seed=3)
    api.save_model(model, model_dir, source="one-process test")
    back = api.load_model(model_dir)
    a, b = weights.export_state_dict(model), weights.export_state_dict(back)
    same = a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)
    with open(result, "w") as f:
        f.write(f"ok same={same}\n")
multihost_utils.sync_global_devices("end")
print(f"process {pid} done", flush=True)
