"""``python train.py --config=configs/<exp>.py --workdir=DIR [--config.<field>=<value> ...]``.

Usage errors (a missing flag, an unknown config field, a value of the wrong type or range) exit with status 2
and a message naming the flag or field, as argparse does; a checkpoint that does not fit the config too.
"""

from __future__ import annotations

import os
import sys

from ..config_cli import parse, usage_error
from ..host_memory import keep_freed_memory

USAGE = """Train Medical SAM 2 (SAM 2 with the self-sorting memory bank).

  python train.py --config=configs/demo.py --workdir=runs/demo [--config.<field>=<value> ...]

Configs: configs/demo.py (CPU, minutes), configs/ct_3d.py (the paper's 3D CT setting, 1024 px),
configs/oneprompt_2d.py (2D image sets), configs/pod.py (multi-host TPU/GPU, FSDP). Every field of
configs/base.py can be overridden, e.g. --config.total_steps=100 --config.image_size=512
--config.mesh.fsdp=8 --config.init_from=models/sam2.1_tiny --config.freeze="('image_encoder',)".
The same command with the same --workdir resumes from the latest checkpoint.
"""


CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=3600",
                        "--xla_cpu_collective_timeout_seconds=3600",
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")


def relax_cpu_collective_timeouts() -> None:
    """XLA:CPU aborts a collective that waits 40 s for its peers. Virtual CPU devices share the cores, so on
    a busy machine one device can fall that far behind the others without anything being wrong; give them
    an hour (must run before JAX starts its backend; flags already in XLA_FLAGS win)."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_COLLECTIVE_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _usage_error(msg: str) -> None:
    usage_error("train.py", msg, "configs/base.py")


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()  # before JAX starts: each step reuses the last one's host memory (see host_memory)
    relax_cpu_collective_timeouts()
    from absl import flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, curves (resumes if it holds a "
                            "checkpoint)", flag_values=fv)

    fv = parse(argv, prog="train.py", usage=USAGE, config_help="path to a config file (configs/*.py)",
               fields_from="configs/base.py", example_config="configs/demo.py", define=define,
               required={"workdir": "--workdir=runs/demo"})
    config, workdir = fv["config"], fv["workdir"]
    from .checkpoint import CheckpointMismatch
    from .config import ConfigError
    from .loop import train

    try:
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl's global flags
        result = train(config.value, workdir.value)
    except ConfigError as e:
        _usage_error(str(e))
    except CheckpointMismatch as e:
        _usage_error(str(e))
    if result.get("interrupted"):
        sys.exit(128 + int(result["interrupted"]))  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
