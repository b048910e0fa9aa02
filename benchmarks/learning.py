"""Does it learn? Train the demo config from random init and from a converted model, evaluate on held-out
phantoms, and compare with the copy-mask baseline (the prompted slice's ground truth pasted on every later
slice of the sequence).

    python -m benchmarks.learning                          # 200 steps each, 256 px, JSON to benchmarks/results/
    python -m benchmarks.learning --steps 50 --image-size 128 --runs random

"From a converted model": pretrained SAM 2 checkpoints cannot be downloaded here, so a randomly initialised
model written by ``medsam2_jax.save_model`` (the format ``convert/sam2_to_flax.py`` writes) stands in; with a
real converted checkpoint pass ``--init-from models/sam2.1_tiny``. Each run is ``python train.py`` with
``configs/demo.py`` and the overrides printed, in a workdir under ``--out``; the held-out numbers are its
``eval.json`` (see ``medsam2_jax/train/evaluate.py`` for the protocol).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, workdir: Path, steps: int, image_size: int, frames: int, init_from: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={workdir}",
           f"--config.total_steps={steps}", f"--config.image_size={image_size}", f"--config.num_frames={frames}",
           f"--config.checkpoint_every={max(steps // 2, 1)}", f"--config.log_every={max(steps // 50, 1)}",
           "--config.eval.phantoms=3", "--config.eval.batches=6", "--config.progress=False", *extra]
    if init_from:
        cmd.append(f"--config.init_from={init_from}")
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t
    evals = json.loads((workdir / "eval.json").read_text())
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "before": evals[0], "after": evals[-1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--steps", type=int, default=200, help="training steps per run")
    ap.add_argument("--image-size", type=int, default=256, help="S, a multiple of 32")
    ap.add_argument("--frames", type=int, default=4, help="frames per training sequence")
    ap.add_argument("--runs", nargs="+", default=["random", "converted"], choices=["random", "converted"],
                    help="random: random init; converted: init_from a saved model directory")
    ap.add_argument("--init-from", default="", help="a converted model directory for the 'converted' run "
                    "(default: a random model saved in the converted format stands in)")
    ap.add_argument("--out", default="out/bench/learning", help="workdirs of the runs")
    ap.add_argument("--json", default="benchmarks/results/learning.json", help="where the results go")
    ap.add_argument("--extra", action="append", default=[], help="one more train.py flag, e.g. --extra=--config.lr=3e-4 "
                    "(repeatable)")
    a = ap.parse_args(argv)
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.common import machine_info

    import os

    args = sys.argv[1:] if argv is None else list(argv)
    results = {"command": " ".join(["python -m benchmarks.learning", *args]), "machine": machine_info(),
               "load_average_before": os.getloadavg(), "steps": a.steps, "image_size": a.image_size,
               "frames": a.frames, "runs": {}}
    for name in a.runs:
        init = ""
        if name == "converted":
            init = a.init_from
            if not init:
                from medsam2_jax import api

                init = str(out / "stand_in_model")
                api.save_model(api.random_model("sam2.1_hiera_t", a.image_size, seed=123), init,
                               source="random stand-in for a converted checkpoint")
        wd = out / name
        if wd.exists():
            import shutil

            shutil.rmtree(wd)
        results["runs"][name] = run(name, wd, a.steps, a.image_size, a.frames, init, a.extra)
    results["load_average_after"] = os.getloadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2))
    print("\n| run | steps | wall | Dice before | Dice after | copy-mask baseline |\n|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {a.steps} | {r['wall_s'] / 60:.1f} min | {r['before']['dice']:.3f} | "
              f"{r['after']['dice']:.3f} | {r['after']['copy_mask_dice']:.3f} |")
    print(f"\nJSON: {a.json}")


if __name__ == "__main__":
    main()
