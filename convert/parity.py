#!/usr/bin/env python
"""Check medsam2-jax against PyTorch SAM 2 on your own checkpoint: per-module errors and pass/fail.

Example:
  python convert/parity.py --checkpoint sam2.1_hiera_tiny.pt --model-name sam2.1_hiera_t
  python convert/parity.py --checkpoint sam2.1_hiera_tiny.pt --model-name sam2.1_hiera_t --image-size 512 --video
  python convert/parity.py --checkpoint sam2.1_hiera_tiny.pt --model-name sam2.1_hiera_t --model models/tiny

Builds the PyTorch model from the `sam2` package (CPU, eval mode, float32) with the checkpoint's weights and
the JAX model converted from the same file (or, with --model DIR, the directory the converter wrote), and
runs both on the same inputs:

  * two images: random normalised noise and a generated smooth image (a bright disk on a gradient);
  * a positive and a negative click: every Hiera stage, FPN level, position encoding, the prompt embeddings,
    the mask logits, IoU predictions, object scores and the object pointer;
  * a box, a box plus a click, and a box with a single mask (SAM 2's dynamic multimask choice);
  * with --video, a clip of --frames frames of a moving disk, clicked on frame 0 and tracked forward by
    SAM2VideoPredictor and by medsam2_jax.tracking.track with SAM 2's FIFO memory.

Each row prints the max and mean absolute error, the largest reference value and the tolerance of its kind
(float32, 'highest' matmul precision: embeddings 1e-4 and logits 1e-3, relative to max(1, |ref|); scores
1e-4 and positional encodings 1e-5 absolute; see medsam2_jax/interop/parity.py). The exit status is 0 when every
row passes, 1 when any fails and 2 when the checkpoint cannot be used. Runs on CPU; at 1024 the first run
spends about a minute compiling.
"""

import argparse
import json
import sys

CORRUPT_KEY = "image_encoder.trunk.patch_embed.proj.bias"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="PyTorch .pt/.pth checkpoint (as for convert/sam2_to_flax.py)")
    ap.add_argument("--model-name", required=True, metavar="NAME",
                    help="model name: sam2.1_hiera_{t,s,b+,l} or sam2_hiera_{t,s,b+,l} (SAM 2.0)")
    ap.add_argument("--image-size", type=int, default=1024, help="input size S, a multiple of 32 (default 1024)")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="check this converted model directory instead of converting the checkpoint in memory")
    ap.add_argument("--video", action="store_true", help="also track a short clip against SAM2VideoPredictor")
    ap.add_argument("--frames", type=int, default=8, help="frames in the --video clip (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random image (default 0)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="JAX's persistent compilation cache (a second run skips the compiles); 'none' turns it "
                    "off (default: $MEDSAM2_JAX_CACHE or ~/.cache/medsam2-jax/xla)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the rows to this JSON file")
    ap.add_argument("--corrupt-for-test", action="store_true",
                    help=f"(self-test) add 0.05 to our {CORRUPT_KEY} after loading: the check must then FAIL")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_size <= 0 or args.image_size % 32:
        print(f"error: --image-size must be a positive multiple of 32, got {args.image_size}", file=sys.stderr)
        return 2
    if args.frames < 2:
        print(f"error: --frames must be at least 2, got {args.frames}", file=sys.stderr)
        return 2

    import time

    import jax

    t0 = time.perf_counter()

    def say(msg: str) -> None:  # the JAX phases compile for up to minutes: say what is running
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    # Parity is measured in float32 with full-precision matmuls on both sides.
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import torch

    from medsam2_jax import api, compile_cache
    from medsam2_jax.interop import parity, torch_checkpoint, torch_models, weights
    from medsam2_jax.model.sam2 import normalize_images
    from medsam2_jax.model.sizes import get_spec

    compile_cache.enable(args.compile_cache)
    s = args.image_size
    say(f"reading {args.checkpoint}")
    try:
        name = get_spec(args.model_name).name
        sd = torch_checkpoint.strip_prefix(torch_checkpoint.read_torch_checkpoint(args.checkpoint))
        if args.model:
            model = api.load_model(args.model, image_size=s)
            if model.model_name != name:
                raise api.CheckpointError(f"{args.model} holds {model.model_name}, not --model-name {name}")
            torch_checkpoint.convert_state_dict(sd, name, s, source=args.checkpoint)  # the same checks on the file
        else:
            model = torch_checkpoint.convert_state_dict(sd, name, s, source=args.checkpoint)
    except (api.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say("building the PyTorch model (sam2 package)")
    tm = torch_models.build_torch_model(name, s, video=args.video)
    tm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    tm.eval()
    if args.corrupt_for_test:
        entry = next(e for e in weights.iter_entries(model) if e.torch_key == CORRUPT_KEY)
        entry.variable.set_value(entry.variable.get_value() + 0.05)

    print(f"{name} at {s}x{s}: PyTorch (sam2 package) vs medsam2-jax"
          f"{' (' + args.model + ')' if args.model else ''}, weights from {args.checkpoint}")
    rng = np.random.default_rng(args.seed)
    images = np.stack([rng.standard_normal((s, s, 3)).astype(np.float32),
                       np.asarray(normalize_images(parity.smooth_image(s)), np.float32)])
    pts = np.array([[0.4, 0.45], [0.8, 0.2]], np.float32) * s  # on the disk, then off it
    points, labels = np.stack([pts, pts]), np.array([[1, 0], [1, 0]], np.int32)
    boxes = np.tile(np.array([0.22, 0.27, 0.58, 0.63], np.float32) * s, (2, 1))

    say("image encoder, prompt encoder and mask decoder with clicks (JAX compiles on first use)")
    rows = parity.image_path_rows(tm, model, images, points, labels)
    tfeats = parity.torch_image_features(tm, images)
    feats = parity.jax_encode(model, images)
    say("boxes, box + click, single mask")
    rows += parity.predict_rows(tm, model, tfeats, feats, "box", boxes=boxes, extra_padding=1)
    rows += parity.predict_rows(tm, model, tfeats, feats, "box + click", boxes=boxes, points=points[:, :1],
                                labels=labels[:, :1], extra_padding=2)
    rows += parity.predict_rows(tm, model, tfeats, feats, "box, one mask", boxes=boxes, multimask=False)
    if args.video:
        say(f"tracking a {args.frames}-frame clip with both (SAM2VideoPredictor, medsam2_jax.tracking.track)")
        clip = np.asarray(normalize_images(parity.moving_disk_clip(s, args.frames)), np.float32)
        prompt = [{"frame": 0, "points": [[0.35 * s, 0.4 * s]], "labels": [1]}]
        rows += parity.video_rows(tm, model, clip, prompt, "forward", name=f"video ({args.frames} frames)")

    say("done")
    print(parity.format_rows(rows))
    failed = [r for r in rows if not r.ok]
    worst = max(rows, key=lambda r: r.max_abs / max(r.tol, 1e-30))
    print(f"{len(rows) - len(failed)}/{len(rows)} rows pass; closest to its tolerance: {worst.name} "
          f"(max {worst.max_abs:.2e}, tol {worst.tol:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "image_size": s, "checkpoint": args.checkpoint,
                       "rows": [vars(r) for r in rows]}, f, indent=1)
    if failed:
        print(f"FAIL: {len(failed)} row(s) exceed their tolerance: " + ", ".join(r.name for r in failed))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
