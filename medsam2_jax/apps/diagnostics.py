"""The paper's Figure 6 analysis: pairwise mutual information between memory-bank entries as a sequence runs.

    python -m medsam2_jax.apps.diagnostics --out out/diagnostics                      # random model, CT phantom
    python -m medsam2_jax.apps.diagnostics --model models/sam2.1_t --out out/diag --K 16

A phantom volume (:mod:`medsam2_jax.data.phantoms`) is preprocessed as in the paper, one structure
(``--label``) is prompted with its ground-truth mask on its first slice, and its slices are tracked
forward with each bank policy (``fifo``: SAM 2's; ``self_sorting``: the paper's) — the same model, frames
and prompt. After every step the tracker's ``trace`` says which frames the bank holds; each entry's content
is recomputed and the pairwise mutual information (MI) between the entries is measured. The paper reports
that, with the self-sorting bank, total MI falls as the sequence runs (2.54 -> 1.43 on ISIC: the entries
become less redundant). Writes ``mi.png`` (mean pairwise MI per step for each policy, and the pairwise MI
matrices at the first step with a full bank and at the last step) and ``mi.json`` (every number).

The proxy and the estimator (documented choices; the paper does not define its estimator)
------------------------------------------------------------------------------------------
* **What an entry is** (``--features``): ``memory`` (default) — the entry's memory features as the bank
  stores them (``(S/16)^2 x 64`` values: the memory encoder applied to the frame's image embedding and its
  predicted mask, rounded to bfloat16 like the tracker's), recomputed from the frame's features and the
  prediction the tracker made for it (a forward pass visits each frame once, so this *is* the stored
  entry). ``descriptor`` — the frame descriptor the bank sorts and resamples with (eqs. 2 and 4).
  ``image`` — the raw image embedding (``(S/16)^2 x 256``).
* **MI of two entries** ``u, v`` (vectors of equal length ``N``): the paired values ``(u_k, v_k)`` are
  samples of two random variables; each is discretised into ``bins`` equal-frequency bins (by rank, so the
  estimate ignores any monotone rescaling and every marginal is uniform: ``H = log2(bins)``), and the
  plug-in MI of the joint histogram is reported in **bits**. Identical entries give ``log2(bins)`` (the
  maximum), independent ones about ``(bins - 1)^2 / (2 N ln 2)`` bits (the plug-in bias; reported in the
  JSON as ``bias_bits``).
* **Per step**: ``mi_mean`` is the mean over pairs ``i < j`` of the valid entries, ``mi_total`` their sum
  (the paper's "total"); ``null`` while fewer than two entries are held.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..memory.bank import BankConfig, make_descriptor
from ..model.sam2 import SAM2
from ..tracking import (TrackerConfig, bucketed, descriptor_grid, encode_frames, make_prompts, pad_frames,
                       run_sequence, take_frames)

FEATURES = ("memory", "descriptor", "image")


# ---------------------------------------------------------------------------------------------- estimator
def quantile_bins(x: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bin index (0..bins-1) of each value of ``x`` (by rank; ties by position)."""
    x = np.asarray(x).reshape(-1)
    ranks = np.empty(x.size, np.int64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size)
    return ranks * bins // max(x.size, 1)


def mutual_information(u: np.ndarray, v: np.ndarray, bins: int = 16) -> float:
    """Plug-in MI (bits) between the paired values of ``u`` and ``v`` after equal-frequency binning."""
    u, v = np.asarray(u).reshape(-1), np.asarray(v).reshape(-1)
    if u.size != v.size or u.size == 0:
        raise ValueError(f"u and v must be non-empty and of equal size, got {u.size} and {v.size}")
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    return _mi_from_bins(quantile_bins(u, bins), quantile_bins(v, bins), bins)


def _mi_from_bins(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    joint = np.bincount(a * bins + b, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    p = joint / joint.sum()
    pa, pb = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / (pa @ pb)[nz])))


def pairwise_mi(entries: np.ndarray, bins: int = 16) -> np.ndarray:
    """``(M, M)`` MI matrix (bits) of ``M`` entries ``(M, ...)``; the diagonal is each entry's entropy."""
    e = np.asarray(entries).reshape(len(entries), -1)
    b = [quantile_bins(x, bins) for x in e]
    m = np.zeros((len(e), len(e)))
    for i in range(len(e)):
        for j in range(i, len(e)):
            m[i, j] = m[j, i] = _mi_from_bins(b[i], b[j], bins)
    return m


def plugin_bias_bits(n: int, bins: int) -> float:
    """Expected plug-in MI of independent variables (bits), to first order: (bins-1)^2 / (2 n ln 2)."""
    return (bins - 1) ** 2 / (2.0 * n * math.log(2.0))


# ---------------------------------------------------------------------------------------------- entries
@functools.partial(jax.jit, static_argnames=("graphdef", "bf16"))
def _memories(graphdef, state, top, low_res, obj, bf16):
    model = nnx.merge(graphdef, state)
    mem = model.encode_memory(top, low_res, obj[:, None], False)
    return mem.astype(jnp.bfloat16).astype(jnp.float32) if bf16 else mem


def entry_features(model: SAM2, feats: dict[str, Any], out: Mapping[str, Any], kind: str,
                   cfg: TrackerConfig) -> np.ndarray:
    """Per frame of the sequence, ``(T, ...)``: what :data:`FEATURES` ``kind`` says an entry is."""
    top = feats["fpn"][-1]
    if kind == "image":
        return np.asarray(top)
    if kind == "descriptor":
        return np.asarray(make_descriptor(top, descriptor_grid(top.shape[1], cfg.descriptor_grid)))
    if kind != "memory":
        raise ValueError(f"features must be one of {FEATURES}, got {kind!r}")
    t = top.shape[0]
    graphdef, state = nnx.split(model)
    return np.asarray(_memories(graphdef, state, top, out["low_res_masks"][0, :t],
                                out["object_score_logits"][0, :t], cfg.store_memory_bf16))


def analyse_run(trace: Mapping[str, np.ndarray], entries: np.ndarray, bins: int) -> dict[str, Any]:
    """Pairwise MI of the bank's entries after every step of one run (``trace`` of one object, numpy)."""
    cache: dict[tuple[int, int], float] = {}
    binned: dict[int, np.ndarray] = {}

    def mi(i: int, j: int) -> float:
        key = (min(i, j), max(i, j))
        if key not in cache:
            for f in key:
                if f not in binned:
                    binned[f] = quantile_bins(entries[f], bins)
            cache[key] = _mi_from_bins(binned[key[0]], binned[key[1]], bins)
        return cache[key]

    steps = []
    k = trace["bank_valid"].shape[-1]
    first_full = None
    for s in range(len(trace["frame"])):
        if not bool(trace["active"][s]):
            continue
        frames = sorted(int(f) for f, v in zip(trace["bank_frame"][s], trace["bank_valid"][s]) if v)
        mat = [[mi(a, b) for b in frames] for a in frames]
        pairs = [mat[i][j] for i in range(len(frames)) for j in range(i + 1, len(frames))]
        row = {
            "step": s, "frame": int(trace["frame"][s]), "iou": float(trace["iou"][s]), "bank_frames": frames,
            "mi_mean": float(np.mean(pairs)) if pairs else None, "mi_total": float(np.sum(pairs)) if pairs else None,
            "matrix": mat,
        }
        steps.append(row)
        if first_full is None and len(frames) == k:
            first_full = row
    last = next((r for r in reversed(steps) if len(r["bank_frames"]) >= 2), None)
    return {"steps": steps, "first_full": first_full, "final": last}


def analyse(model: SAM2, frames: Any, prompt: Mapping[str, Any], configs: Mapping[str, TrackerConfig], *,
            features: str = "memory", bins: int = 16, key: jax.Array | None = None,
            length_bucket: int | None = None) -> dict[str, Any]:
    """Track ``frames`` (T, S, S, 3) forward from frame 0 (``prompt`` is on it) with each config and measure
    the pairwise MI of the bank's entries after every step. Returns the JSON-ready results."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    frames = jnp.asarray(frames)
    model.check_images(frames)
    t = frames.shape[0]
    key = jax.random.key(0) if key is None else key
    first = next(iter(configs.values()))
    feats = encode_frames(model, frames, batch=first.encode_batch, devices=first.encode_devices)
    length = bucketed(t, length_bucket)
    res: dict[str, Any] = {"features": features, "bins": bins, "units": "bits", "num_frames": t,
                           "estimator": "plug-in MI of equal-frequency-binned paired entry values",
                           "policies": {}}
    for name, cfg in configs.items():
        p = make_prompts([[dict(prompt, frame=0)]], num_frames=length, image_size=model.image_size, config=cfg)
        out = run_sequence(model, pad_frames(feats, length), p, key, cfg, "forward")
        trace = {k: np.asarray(v[:, 0]) for k, v in out["trace"].items()}
        trace = {k: v[:t] for k, v in trace.items()}  # padded steps come last
        entries = entry_features(model, take_frames(feats, np.arange(t)), out, features, cfg)
        run = analyse_run(trace, entries, bins)
        run["bank"] = dataclasses.asdict(cfg.bank)
        run["mean_iou"] = float(np.mean(trace["iou"]))
        run["entry_size"] = int(np.prod(entries.shape[1:]))
        run["bias_bits"] = plugin_bias_bits(run["entry_size"], bins)
        res["policies"][name] = run
    return res


# ---------------------------------------------------------------------------------------------- outputs
def plot(results: Mapping[str, Any], path: str | Path) -> Path:
    """``mi.png``: mean pairwise MI per step per policy, and the MI matrices at the first full and last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(results["policies"])
    fig = plt.figure(figsize=(12, 3.2 * max(len(pols), 1)))
    gs = fig.add_gridspec(max(len(pols), 1), 3, width_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(gs[:, 0])
    for name in pols:
        steps = results["policies"][name]["steps"]
        xs = [r["step"] for r in steps if r["mi_mean"] is not None]
        ys = [r["mi_mean"] for r in steps if r["mi_mean"] is not None]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel("step (frames tracked)")
    ax.set_ylabel(f"mean pairwise MI of bank entries ({results['units']})")
    ax.set_title(f"bank entry redundancy ({results['features']} features, {results['bins']} bins)")
    ax.legend()
    for row, name in enumerate(pols):
        for col, which in ((1, "first_full"), (2, "final")):
            sub = fig.add_subplot(gs[row, col])
            r = results["policies"][name][which]
            if r is None:
                sub.set_axis_off()
                sub.set_title(f"{name}: no {which.replace('_', ' ')} bank")
                continue
            im = sub.imshow(np.asarray(r["matrix"]), cmap="viridis", vmin=0)
            sub.set_xticks(range(len(r["bank_frames"])), r["bank_frames"], fontsize=7)
            sub.set_yticks(range(len(r["bank_frames"])), r["bank_frames"], fontsize=7)
            tot = r["mi_total"]
            sub.set_title(f"{name}, step {r['step']}: total {tot:.2f}" if tot is not None else name, fontsize=9)
            fig.colorbar(im, ax=sub, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``mi.json`` and ``mi.png`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "mi.json"
    js.write_text(json.dumps(results, indent=1))
    return plot(results, out / "mi.png"), js


# ---------------------------------------------------------------------------------------------- CLI
def phantom_sequence(seed: int, kind: str, shape: Sequence[int], size: int, label: int):
    """Preprocessed phantom slices from the first slice of ``label`` on, and that slice's mask."""
    from ..data.io import Volume
    from ..data.phantoms import PHANTOM_LABELS, make_phantom
    from ..data.preprocess import preprocess_case

    image, labels, affine = make_phantom(seed, kind, tuple(shape), orientation="RAS")
    if label not in PHANTOM_LABELS:
        raise ValueError(f"--label must be one of {sorted(PHANTOM_LABELS)} ({PHANTOM_LABELS}), got {label}")
    pre = preprocess_case(Volume.from_array(image, affine), labels, "CT" if kind == "ct" else "MRI", size=size)
    target = pre.labels == label
    present = np.flatnonzero(target.reshape(len(target), -1).any(axis=1))
    if not present.size:
        raise ValueError(f"label {label} ({PHANTOM_LABELS[label]}) is absent from phantom seed {seed} "
                         "after preprocessing")
    z = int(present[0])
    return pre.image[z:], target[z]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medsam2_jax.apps.diagnostics", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/diagnostics", help="output folder for mi.png and mi.json")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="converted model directory (api.load_model); default: a random model")
    p.add_argument("--model-name", default="sam2.1_hiera_t", metavar="NAME", help="random model size (without --model)")
    p.add_argument("--image-size", type=int, default=256, help="S (frames are S x S)")
    p.add_argument("--object-bias", type=float, default=2.0,
                   help="random model only: added to the object-score bias so the object is present")
    p.add_argument("--kind", choices=("ct", "mri"), default="ct", help="phantom kind")
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--phantom-shape", type=int, nargs=3, default=(96, 96, 48), metavar=("X", "Y", "Z"))
    p.add_argument("--label", type=int, default=1, help="phantom structure to track (1 = large organ)")
    p.add_argument("--policies", nargs="+", choices=("fifo", "self_sorting"), default=("fifo", "self_sorting"))
    p.add_argument("--K", type=int, default=6, help="bank slots (both policies)")
    p.add_argument("--c-thresh", type=float, default=0.5, help="self_sorting confidence gate")
    p.add_argument("--features", choices=FEATURES, default="memory", help="what an entry is for MI")
    p.add_argument("--bins", type=int, default=16, help="equal-frequency bins per variable")
    p.add_argument("--seed", type=int, default=0, help="random key of the resampling")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from .. import api

    if args.model:
        model = api.load_model(args.model, image_size=args.image_size)
        source = str(args.model)
    else:
        model = api.random_model(args.model_name, args.image_size, seed=0, init="flax",
                                 object_bias=args.object_bias)
        source = f"random {args.model_name} (object bias {args.object_bias:+g})"
    frames, mask = phantom_sequence(args.phantom_seed, args.kind, args.phantom_shape, args.image_size, args.label)
    configs = {}
    for pol in args.policies:
        bank = BankConfig.sam2_fifo(K=args.K) if pol == "fifo" else BankConfig(K=args.K, c_thresh=args.c_thresh)
        configs[pol] = TrackerConfig(bank=bank)
    res = analyse(model, frames, {"mask": mask}, configs, features=args.features, bins=args.bins,
                  key=jax.random.key(args.seed))
    res["meta"] = {"model": source, "phantom": {"kind": args.kind, "seed": args.phantom_seed,
                                                "shape": list(args.phantom_shape), "label": args.label},
                   "image_size": args.image_size}
    png, js = write_outputs(res, args.out)
    print(f"{'policy':<14}{'steps':>6}{'MI first full':>15}{'MI final':>10}{'total final':>13}")
    for name, r in res["policies"].items():
        ff, fin = r["first_full"], r["final"]
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"
        print(f"{name:<14}{len(r['steps']):>6}{fmt(ff and ff['mi_mean']):>15}{fmt(fin and fin['mi_mean']):>10}"
              f"{fmt(fin and fin['mi_total']):>13}")
    print(f"wrote {png} and {js}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
