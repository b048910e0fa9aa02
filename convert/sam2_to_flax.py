#!/usr/bin/env python
"""Convert a PyTorch SAM 2 / SAM 2.1 / Medical-SAM2 checkpoint into a medsam2-jax model directory.

Example:
  python convert/sam2_to_flax.py --checkpoint sam2.1_hiera_tiny.pt --model sam2.1_hiera_t --out models/tiny

The conversion is strict: every tensor of the file must map to exactly one Flax parameter with the right
shape, and every Flax parameter must be filled; otherwise the command fails and lists the offending keys.
The model size is checked against the tensor shapes ("this file holds sam2.1_hiera_s, not ..."). The output
directory is an orbax checkpoint (params/) plus medsam2.json, loaded by `medsam2_jax.load_model(DIR)`.
With --export-torch FILE the converted weights are written back to a PyTorch state dict, which is
bit-identical to the input (use it to check a round trip, or to take JAX-trained weights back to PyTorch).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main(argv=None) -> int:
    from medsam2_jax.model.sizes import MODEL_NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="PyTorch .pt/.pth file ({'model': state_dict} or a state dict)")
    ap.add_argument("--model", required=True, help=f"model name, one of: {', '.join(MODEL_NAMES)}")
    ap.add_argument("--image-size", type=int, default=1024, help="default input size S (multiple of 32; default 1024)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--export-torch", default=None, help="also write the converted weights back to this .pt file")
    args = ap.parse_args(argv)

    from medsam2_jax import api

    try:
        sd = api.read_torch_checkpoint(args.checkpoint)
        model = api.convert_state_dict(sd, args.model, args.image_size, source=args.checkpoint)
    except (api.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = api.save_model(model, args.out, source=os.path.basename(args.checkpoint))
    n = sum(v.size for v in sd.values())
    print(f"converted {len(sd)} tensors ({n:,} values) of {model.model_name} -> {out}")
    if args.export_torch:
        import numpy as np
        import torch

        back = api.export_torch_state_dict(model)
        torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()}}, args.export_torch)
        same = all(np.array_equal(back[k], sd[k]) for k in sd)
        print(f"exported back to {args.export_torch}: round trip {'bit-exact' if same else 'DIFFERS'}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
