"""The flag parsing that ``train.py`` and ``eval.py`` share: an ``ml_collections`` config file with
``--config.<field>=<value>`` overrides, a few command flags, ``--help``, and usage errors that exit with
status 2 (argparse's convention, used by every medsam2-jax command) and say how to fix them."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from . import compile_cache


def usage_error(prog: str, msg: str, fields_from: str) -> NoReturn:
    print(f"{prog}: error: {msg}\nRun `python {prog} --help` for the flags and {fields_from} for the fields.",
          file=sys.stderr)
    sys.exit(2)


def parse(argv: Sequence[str] | None, *, prog: str, usage: str, config_help: str, fields_from: str,
          example_config: str, define: Callable, required: dict[str, str]):
    """Parse ``argv`` (default ``sys.argv``) into an absl ``FlagValues`` with ``--config`` (a config file,
    locked), ``--compile_cache`` and the flags that ``define(flag_values)`` adds. ``--help`` prints ``usage``
    and every flag, then exits 0. ``required`` maps a flag name to an example of its use: a missing one is a
    usage error. Unknown config fields and bad values are usage errors naming the field."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, config_help, flag_values=fv, lock_config=True)
    define(fv)
    flags.DEFINE_string("compile_cache", None, "directory of JAX's persistent compilation cache (a second run "
                        "with the same shapes skips the XLA compiles); 'none' turns it off. Default: "
                        "$MEDSAM2_JAX_CACHE or ~/.cache/medsam2-jax/xla", flag_values=fv)
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(usage)
        print("Flags:")
        for name in fv:
            f = fv[name]
            print(f"  --{name}: {f.help}" + (f" (default: {f.default!r})" if f.default else ""))
        sys.exit(0)
    saved = sys.argv
    try:
        sys.argv = argv  # ml_collections' config flag finds the config file's overrides in sys.argv
        fv(argv)
    except Exception as e:  # absl's flags.Error, or what a config override raises (unknown field, bad type)
        cause = e.__cause__ or e.__context__
        if isinstance(e, KeyError) or isinstance(cause, KeyError) or "Could not override" in str(e) or \
                str(e).startswith("\"'"):
            bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
            usage_error(prog, f"unknown config field in {', '.join(bad)} ({e}); the fields are those of "
                        f"{fields_from} (nested ones with dots)", fields_from)
        usage_error(prog, str(e).strip() or type(e).__name__, fields_from)
    finally:
        sys.argv = saved
    if fv["config"].value is None:
        usage_error(prog, f"--config is required, e.g. --config={example_config}", fields_from)
    for name, example in required.items():
        if fv[name].value in (None, ""):
            usage_error(prog, f"--{name} is required, e.g. {example}", fields_from)
    compile_cache.enable(fv["compile_cache"].value)
    return fv
