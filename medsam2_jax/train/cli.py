"""``python train.py --config=configs/<exp>.py --workdir=DIR [--config.<field>=<value> ...]``.

Usage errors (a missing flag, an unknown config field, a value of the wrong type or range) exit with status 2
and a message naming the flag or field, as argparse does; a checkpoint that does not fit the config too.
"""

from __future__ import annotations

import os
import sys

USAGE = """Train Medical SAM 2 (SAM 2 with the self-sorting memory bank).

  python train.py --config=configs/demo.py --workdir=runs/demo [--config.<field>=<value> ...]

Configs: configs/demo.py (CPU, minutes), configs/ct_3d.py (the paper's 3D CT setting, 1024 px),
configs/oneprompt_2d.py (2D image sets), configs/pod.py (multi-host TPU/GPU, FSDP). Every field of
configs/base.py can be overridden, e.g. --config.total_steps=100 --config.image_size=512
--config.mesh.fsdp=8 --config.init_from=models/sam2.1_tiny --config.freeze="('image_encoder',)".
The same command with the same --workdir resumes from the latest checkpoint.
"""


DEFAULT_CACHE = os.environ.get("MEDSAM2_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medsam2-jax",
                                                                   "xla"))


def enable_compile_cache(directory: str) -> None:
    """JAX's persistent compilation cache in ``directory`` ('' = off): a run started again (a resume, the
    next experiment with the same shapes) loads its compiled programs instead of compiling them."""
    if not directory:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(directory)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


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
    print(f"train.py: error: {msg}\nRun `python train.py --help` for the flags and configs/base.py for the fields.",
          file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    relax_cpu_collective_timeouts()
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "path to a config file (configs/*.py)",
                                             flag_values=flag_values, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, curves (resumes if it "
                                  "holds a checkpoint)", flag_values=flag_values)
    cache = flags.DEFINE_string("compile_cache", DEFAULT_CACHE, "directory of JAX's persistent compilation cache "
                                "(later runs skip the XLA compiles); '' turns it off. Default: $MEDSAM2_JAX_CACHE "
                                "or ~/.cache/medsam2-jax/xla", flag_values=flag_values)
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(USAGE)
        print("Flags:")
        for name in ("config", "workdir", "compile_cache"):
            f = flag_values[name]
            print(f"  --{name}: {f.help}" + (f" (default: {f.default!r})" if f.default else ""))
        sys.exit(0)
    try:
        flag_values(argv)
    except Exception as e:  # absl's flags.Error, or what a config override raises (unknown field, bad type)
        cause = e.__cause__ or e.__context__
        if isinstance(e, KeyError) or isinstance(cause, KeyError) or "Could not override" in str(e) or \
                str(e).startswith("\"'"):
            bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
            _usage_error(f"unknown config field in {', '.join(bad)} ({e}); the fields are those of configs/base.py "
                         "(nested ones with dots, e.g. --config.mesh.fsdp=2)")
        _usage_error(str(e).strip() or type(e).__name__)
    if config.value is None:
        _usage_error("--config is required, e.g. --config=configs/demo.py")
    if not workdir.value:
        _usage_error("--workdir is required, e.g. --workdir=runs/demo")

    enable_compile_cache(cache.value)
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
