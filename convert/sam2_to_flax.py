#!/usr/bin/env python
"""Convert a PyTorch SAM 2 / SAM 2.1 / Medical-SAM2 checkpoint into a medsam2-jax model directory.

Example:
  python convert/sam2_to_flax.py --checkpoint sam2.1_hiera_tiny.pt --model-name sam2.1_hiera_t --out models/tiny

Reads Meta's files ({"model": state_dict}), bare state dicts and Medical-SAM2 fine-tuned files
({"model": ..., "parameter": ...}, bf16 tensors, a DataParallel "module." prefix). The conversion is strict:
every tensor of the file must map to exactly one Flax parameter with the right shape and finite values, and
every Flax parameter must be filled; otherwise the command fails (exit status 2) and names the offending keys.
The model size and version are checked against the tensor shapes ("... holds a sam2.1_hiera_s model, not
sam2.1_hiera_t: convert it as --model-name sam2.1_hiera_s").

The output directory holds an orbax checkpoint (params/, PyTorch key names) and medsam2.json; load it with
`medsam2_jax.load_model(DIR)` (optionally at another image size: `load_model(DIR, image_size=512)`).
With --export-torch FILE the converted weights are written back to a PyTorch {"model": state_dict} file,
read again and compared with the input: the round trip is bit-exact (bf16 inputs are upcast to float32,
which is exact). Use it to check a conversion, or to take JAX-trained weights back to PyTorch.
"""

import argparse
import os
import sys

MODEL_HELP = ("model name: sam2.1_hiera_{t,s,b+,l} or sam2_hiera_{t,s,b+,l} (SAM 2.0); long forms such as "
              "sam2.1_hiera_tiny or sam2.1_hiera_base_plus work too")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="PyTorch .pt/.pth file")
    ap.add_argument("--model-name", required=True, metavar="NAME", help=MODEL_HELP)
    ap.add_argument("--image-size", type=int, default=1024,
                    help="input size S recorded as the default for load_model (a multiple of 32; default 1024)")
    ap.add_argument("--out", required=True, help="output directory (created; its params/ is replaced)")
    ap.add_argument("--export-torch", default=None, metavar="FILE",
                    help="also write the converted weights back to this .pt file and check the round trip")
    args = ap.parse_args(argv)

    import numpy as np

    from medsam2_jax import api
    from medsam2_jax.interop import torch_checkpoint

    try:
        sd = torch_checkpoint.strip_prefix(torch_checkpoint.read_torch_checkpoint(args.checkpoint))
        model = torch_checkpoint.convert_state_dict(sd, args.model_name, args.image_size, source=args.checkpoint)
        out = api.save_model(model, args.out, source=os.path.basename(args.checkpoint))
    except (api.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.size for v in sd.values())
    print(f"converted {len(sd)} tensors ({n:,} values) of {model.model_name} -> {out}")
    print(f"next: python -m medsam2_jax.apps.demo --model {out}   (a phantom CT, with overlays)\n"
          f"      medsam2-segment SCAN.nii.gz --model {out} --slice K --box X0 Y0 X1 Y1 --out mask.nii.gz\n"
          f"      python convert/parity.py --checkpoint {args.checkpoint} --model-name {model.model_name}   "
          "(check the conversion against PyTorch)")
    if args.export_torch:
        torch_checkpoint.export_torch_checkpoint(model, args.export_torch)
        back = torch_checkpoint.read_torch_checkpoint(args.export_torch)
        # Bit patterns, not values: -0.0 vs 0.0 or a changed NaN payload would count as a difference.
        same = back.keys() == sd.keys() and all(
            back[k].shape == sd[k].shape and np.array_equal(back[k].view(np.uint32), sd[k].view(np.uint32))
            for k in sd)
        print(f"exported back to {args.export_torch}: round trip {'bit-exact' if same else 'DIFFERS'}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
