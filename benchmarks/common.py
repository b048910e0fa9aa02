"""What the side-by-side benchmarks share: the machine description and the result file."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys


def machine_info() -> dict:
    """CPU model and count, platform, library versions, JAX devices and (if installed) torch's threads."""
    import flax
    import jax

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "jax_devices": [str(d) for d in jax.devices()]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def write_result(out: pathlib.Path, result: dict) -> None:
    """Write the JSON result (making its folder) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


def command_line(name: str, argv=None) -> str:
    """How this run was started: ``python -m benchmarks.<name>`` and its arguments (``sys.argv`` by default)."""
    return " ".join([f"python -m benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)])


def note_load(load_before, load_after, why: str = "the ratio is fairer") -> None:
    """Print a note when other processes already loaded the CPU at the start (the 1-minute load average above
    half the CPU count; the benchmark's own threads raise the load after it, so that is not the test)."""
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"\nnote: 1-min load average was {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} "
              f"CPUs; other processes share the CPU, so absolute numbers are low and noisy ({why}).")


def write_run(out: pathlib.Path, name: str, argv, fields: dict, info: dict, load_before, load_after, rows,
              table: str) -> None:
    """Write a side-by-side run: which benchmark and command line (``name``, ``argv``), its own ``fields``, and
    what every such run records (the machine, the load average before and after, the result rows and the
    Markdown table)."""
    write_result(out, {"benchmark": name, "command": command_line(name, argv), **fields, "machine": info,
                       "load_average_before": load_before, "load_average_after": load_after, "results": rows,
                       "table_markdown": table})


def check_image_sizes(sizes, flag: str = "--image-sizes") -> None:
    """Exit with a message naming ``flag`` unless every size is a positive multiple of 32."""
    for s in sizes:
        if s <= 0 or s % 32:
            raise SystemExit(f"{flag}: {s} is not a positive multiple of 32")
