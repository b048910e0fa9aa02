"""Input-pipeline throughput: training sequences per second with 0, 1 and 2 grain workers, against the model.

    python -m benchmarks.data_pipeline                       # S=256, T=8, phantoms, hiera_t, JSON to out/bench/
    python -m benchmarks.data_pipeline --workers 0 2 --batches 20 --source memory --model-name none

The question it answers (issue 5, item 9): is the pipeline fast enough that a training step never waits
for it? Each configuration builds the real pipeline (:mod:`medsam2_jax.data.pipeline`: balanced sampling,
augmentation at the paper's probabilities, prompt simulation, batching) over a small dataset written to a
temporary folder (CT-like and MRI-like phantoms as NIfTI, so reading and preprocessing are included; or
``--source memory`` for already preprocessed in-memory cases, which isolates sampling + augmentation +
prompts). It discards the first batch (worker start-up, first loads), then times ``--batches`` batches.

A single-process profile of the per-sequence stages (load + preprocess of a case, drawing the sequence,
augmentation, prompts) is printed too, to show where the time goes.

Comparison with the model: :func:`run` takes ``model_step``, a callable that runs the model's forward and
backward pass on one batch (the dict the pipeline yields) and returns something ``jax.block_until_ready``
accepts. When given, it is compiled on the first batch, timed on the next ones, and the table shows the
model's sequences/s next to the pipeline's and their ratio (> 1: the pipeline keeps up). By default it is
:func:`make_model_step` (``--model-name sam2.1_hiera_t``, a random model at the same S): per sequence of the
batch, encode the T frames, propagate from the prompted frames with the paper's self-sorting memory bank,
BCE + Dice of the low-res logits against the downsampled masks, ``jax.grad`` w.r.t. the ``nnx.Param`` s —
a stand-in for the training step (the training issue builds the real one; this one has no optimizer
update). ``--model-step module:function`` imports another callable; ``--model-name none`` skips the model.

Then, because a separate throughput number does not show contention (the workers and the model share the
CPUs of this machine), the pipeline with the most workers is run *while* the model trains on its batches
(``overlap``): the time the loop spends in ``next(it)`` is what a training step waits for the data.

Measured earlier (2 CPU cores shared with other jobs, load average ~7; S=256, T=8, B=2, phantoms
192x192x48): the pipeline gives 2.3 / 2.4 / 2.6 sequences/s with 0 / 1 / 2 workers (reading and preprocessing a
case, ~0.3 s, dominates: 8 cases and a cache of 2; already preprocessed in-memory cases give ~9 sequences/s).
The model's step is several seconds per sequence on this CPU (``benchmarks/train_step.py`` measures it), so
the pipeline keeps up here. On an accelerator the model step is orders of magnitude faster; rerun there and
give the pipeline enough workers (and cache) for
its sequences/s to exceed the model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np


from medsam2_jax.data import pipeline as pl  # noqa: E402
from medsam2_jax.data import sampling as sp  # noqa: E402
from medsam2_jax.data.augment import AugmentConfig, augment_sequence  # noqa: E402
from medsam2_jax.data.prompts import PromptConfig, training_prompts  # noqa: E402


def phantom_source(root: Path, size: int, n_cases: int, shape, cache_size: int) -> pl.CaseSource:
    from medsam2_jax.data import phantoms

    phantoms.write_phantom_dataset(root / "ct", n_cases, "ct", seed=0, shape=shape)
    phantoms.write_phantom_dataset(root / "mri", n_cases, "mri", seed=1, shape=shape)
    return pl.concat_sources(pl.dataset_source(root / "ct", size), pl.dataset_source(root / "mri", size),
                             cache_size=cache_size)


def memory_source(size: int, n_cases: int, n_slices: int) -> pl.CaseSource:
    """Preprocessed-looking cases: smooth random images, three ellipse targets over a range of slices."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    infos, cases = [], []
    for i in range(2 * n_cases):
        pattern = (np.sin(8 * yy + i) * np.cos(5 * xx))[None, :, :, None]
        img = rng.normal(size=(n_slices, 1, 1, 1)) + pattern
        img = np.repeat(img.astype(np.float32), 3, axis=-1)
        targets = []
        for c in (1, 2, 3):
            z0 = int(rng.integers(0, n_slices // 2))
            z1 = z0 + int(rng.integers(4, n_slices // 2))
            cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.15)
            m = np.zeros((n_slices, size, size), bool)
            m[z0:z1] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            targets.append(pl.ArrayTarget(c, 1, m))
        cases.append(pl.ArrayCase(img, targets))
        first = i < n_cases
        infos.append(sp.CaseInfo("ct_task" if first else "mri_task", "CT" if first else "MRI", name=f"m{i}"))
    return pl.in_memory_source(infos, cases)


def stage_profile(source: pl.CaseSource, cfg: pl.PipelineConfig, n: int) -> dict:
    """Mean seconds per sequence of each stage, in this process (no grain)."""
    sampler = sp.BalancedSampler(source.infos)
    rng = np.random.default_rng(0)
    t_load = []
    for i in range(min(len(source), 4)):  # cold loads (read + preprocess), bypassing the cache
        t = time.perf_counter()
        source._load(i)
        t_load.append(time.perf_counter() - t)
    loaded = {i: source._load(i) for i in range(len(source))}  # all in memory: draws time sampling alone
    get_case = loaded.__getitem__
    t_draw, t_aug, t_prompt = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        seq = sp.draw_balanced_sequence(get_case, sampler, rng, cfg.sampling)
        t1 = time.perf_counter()
        img, msk = augment_sequence(seq.images, seq.masks, rng, cfg.augment, independent_frames=seq.independent_frames)
        t2 = time.perf_counter()
        if not msk[0].any():
            msk = seq.masks
        training_prompts(msk, rng, cfg.prompts)
        t3 = time.perf_counter()
        t_draw.append(t1 - t0)
        t_aug.append(t2 - t1)
        t_prompt.append(t3 - t2)
    worst = dataclasses.replace(cfg.augment, **{f.name: 1.0 for f in dataclasses.fields(AugmentConfig)
                                                 if f.name.startswith("p_")})
    seq = sp.draw_balanced_sequence(get_case, sampler, rng, cfg.sampling)
    t = time.perf_counter()
    for _ in range(3):
        augment_sequence(seq.images, seq.masks, rng, worst)
    t_worst = (time.perf_counter() - t) / 3
    return {
        "load_preprocess_case_s": float(np.mean(t_load)),
        "draw_sequence_s": float(np.mean(t_draw)),
        "augment_s": float(np.mean(t_aug)),
        "augment_every_transform_s": float(t_worst),
        "prompts_s": float(np.mean(t_prompt)),
    }


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_pipeline(source, cfg: pl.PipelineConfig, batches: int) -> dict:
    _log(f"pipeline, {cfg.num_workers} worker(s): {batches} batches")
    t0 = time.perf_counter()
    it = pl.make_iterator(source, cfg)
    next(it)  # start-up: worker processes, first loads
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    t2 = time.perf_counter()
    it.close()
    seqs = batches * cfg.batch_size
    return {"workers": cfg.num_workers, "first_batch_s": t1 - t0, "seconds": t2 - t1,
            "sequences": seqs, "sequences_per_s": seqs / (t2 - t1)}


# ----------------------------------------------------------------------------------------------------------
# The model's forward + backward pass on a pipeline batch (the training loss, without the optimiser).

def make_model_step(model_name: str = "sam2.1_hiera_t", image_size: int = 256, *, num_slots: int = 3,
                    seed: int = 0, tracker_config=None, object_bias: float = 4.0) -> Callable[[dict], Any]:
    """A callable ``step(batch) -> (loss, grads)``: the training loss's forward + backward pass
    (:func:`medsam2_jax.train.step.loss_and_terms`, SAM 2's loss through the tracked sequence) of a random
    ``model_name`` at ``image_size``, jitted, without the optimiser update. ``num_slots``: conditioning frames.

    ``object_bias`` is added to the object-score head's output bias. A random model scores every object as
    absent, and then its masks are the constant -1024 and no gradient flows through them; with the bias the
    objects are present, as a trained model finds a visible target.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medsam2_jax import api, tracking
    from medsam2_jax.train.batch import MODEL_KEYS
    from medsam2_jax.train.step import loss_and_terms, tracker_config as train_tracker, train_mode

    model = api.random_model(model_name, image_size, seed=seed, object_bias=object_bias)
    train_mode(model)
    base = tracking.TrackerConfig(max_cond_frames=num_slots, cond_slots="max") if tracker_config is None \
        else tracker_config
    tcfg = train_tracker(base)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, batch, key):
        return loss_and_terms(nnx.merge(graphdef, p, rest), batch, key, tcfg)[0]

    grad_step = jax.jit(jax.value_and_grad(loss_fn))
    counter = [0]

    def step(batch: dict):
        arrays = {k: jnp.asarray(batch[k]) for k in MODEL_KEYS}
        counter[0] += 1
        return grad_step(params, arrays, jax.random.key(counter[0]))

    step.params = params  # for callers that inspect the gradient's structure
    return step


def time_model(source, cfg: pl.PipelineConfig, model_step: Callable[[dict], Any], batches: int) -> dict:
    import jax

    it = pl.make_iterator(source, dataclasses.replace(cfg, num_workers=0))
    data = [next(it) for _ in range(batches + 1)]
    it.close()
    _log("model step: compiling on the first batch")
    t = time.perf_counter()
    jax.block_until_ready(model_step(data[0]))  # compile
    compile_s = time.perf_counter() - t
    _log(f"model step: compiled in {compile_s:.0f} s; timing {batches} batches")
    t = time.perf_counter()
    for b in data[1:]:
        jax.block_until_ready(model_step(b))
    dt = time.perf_counter() - t
    seqs = batches * cfg.batch_size
    return {"compile_s": compile_s, "seconds": dt, "sequences": seqs, "sequences_per_s": seqs / dt,
            "seconds_per_sequence": dt / seqs}


def time_overlapped(source, cfg: pl.PipelineConfig, model_step: Callable[[dict], Any], batches: int) -> dict:
    """Train on the pipeline's batches (``model_step`` already compiled) and measure the waits for data."""
    import jax

    _log(f"training on the pipeline ({cfg.num_workers} worker(s)): {batches} batches")
    it = pl.make_iterator(source, cfg)
    jax.block_until_ready(model_step(next(it)))  # start-up, outside the timing
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - t
        jax.block_until_ready(model_step(b))
    total = time.perf_counter() - t0
    it.close()
    return {"workers": cfg.num_workers, "seconds": total, "data_wait_s": wait, "wait_fraction": wait / total,
            "sequences_per_s": batches * cfg.batch_size / total}


def run(
    *,
    image_size: int = 256,
    num_frames: int = 8,
    batch_size: int = 2,
    workers: Sequence[int] = (0, 1, 2),
    batches: int = 10,
    source_kind: str = "phantoms",
    n_cases: int = 4,
    phantom_shape=(192, 192, 48),
    cache_size: int = 2,
    profile_sequences: int = 10,
    model_step: Optional[Callable[[dict], Any]] = None,
    model_batches: int = 3,
    overlap_batches: int = 3,
) -> dict:
    """Run the benchmark and return the results dict (see the module docstring for ``model_step``)."""
    cfg = pl.PipelineConfig(image_size=image_size, batch_size=batch_size, seed=0, cache_size=cache_size,
                            shard_index=0, shard_count=1, sampling=sp.SamplingConfig(num_frames=num_frames),
                            prompts=PromptConfig())
    with tempfile.TemporaryDirectory() as tmp:
        if source_kind == "phantoms":
            source = phantom_source(Path(tmp), image_size, n_cases, tuple(phantom_shape), cache_size)
        elif source_kind == "memory":
            source = memory_source(image_size, n_cases, phantom_shape[2])
        else:
            raise ValueError(f"source_kind must be 'phantoms' or 'memory', got {source_kind!r}")
        results = {
            "config": {"image_size": image_size, "num_frames": num_frames, "batch_size": batch_size,
                       "source": source_kind, "cases": len(source), "phantom_shape": list(phantom_shape),
                       "cache_size": cache_size, "batches_timed": batches},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                        "jax_devices": _jax_devices() if model_step is not None else None},
            "stages_single_process": stage_profile(source, cfg, profile_sequences),
            "pipeline": [time_pipeline(source, dataclasses.replace(cfg, num_workers=w), batches) for w in workers],
        }
        if model_step is not None:
            results["model"] = time_model(source, cfg, model_step, model_batches)
            if overlap_batches > 0:
                w = max(workers)
                results["overlap"] = time_overlapped(source, dataclasses.replace(cfg, num_workers=w), model_step,
                                                     overlap_batches)
    return results


def _jax_devices() -> list:
    import jax

    return [str(d) for d in jax.devices()]


def table(results: dict) -> str:
    c = results["config"]
    lines = [f"data pipeline, S={c['image_size']} T={c['num_frames']} B={c['batch_size']}, {c['source']} "
             f"({c['cases']} cases), {results['machine']['cpus']} CPUs",
             "", "| workers | first batch (s) | sequences/s |", "|---:|---:|---:|"]
    for r in results["pipeline"]:
        lines.append(f"| {r['workers']} | {r['first_batch_s']:.2f} | {r['sequences_per_s']:.2f} |")
    st = results["stages_single_process"]
    lines += ["", "per sequence, one process: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in st.items())]
    if "model" in results:
        m = results["model"]
        best = max(r["sequences_per_s"] for r in results["pipeline"])
        lines.append(f"model forward+backward ({results['config'].get('model', 'model_step')}): "
                     f"{m['sequences_per_s']:.2f} sequences/s ({m['seconds_per_sequence'] * 1e3:.0f} ms/sequence, "
                     f"compile {m['compile_s']:.0f} s); best pipeline / model = "
                     f"{best / m['sequences_per_s']:.2f} (> 1: the pipeline keeps up)")
        for r in results["pipeline"]:
            ratio = r["sequences_per_s"] / m["sequences_per_s"]
            lines.append(f"  {r['workers']} worker(s): pipeline / model = {ratio:.2f}")
    if "overlap" in results:
        o = results["overlap"]
        lines.append(f"training on the pipeline ({o['workers']} worker(s)): {o['sequences_per_s']:.2f} sequences/s, "
                     f"waiting for data {o['data_wait_s']:.2f} s of {o['seconds']:.2f} s "
                     f"({100 * o['wait_fraction']:.1f}%)")
    return "\n".join(lines)


def _import_callable(spec: str):
    mod, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--model-step must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(mod), name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--source", choices=["phantoms", "memory"], default="phantoms")
    ap.add_argument("--cases", type=int, default=4, help="cases per modality")
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 192, 48], help="phantom voxels (x y z)")
    ap.add_argument("--cache", type=int, default=2)
    ap.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                    help="model of the built-in forward+backward step (make_model_step), or 'none'")
    ap.add_argument("--model-step", default=None, help="module:function running forward+backward on a batch "
                    "(instead of --model-name)")
    ap.add_argument("--model-batches", type=int, default=3, help="batches timed for the model")
    ap.add_argument("--overlap-batches", type=int, default=3,
                    help="batches trained on the pipeline with the most workers (0: skip)")
    ap.add_argument("--out", default="out/bench/data_pipeline.json")
    a = ap.parse_args(argv)
    if a.model_step:
        step, model = _import_callable(a.model_step), a.model_step
    elif a.model != "none":
        _log(f"building a random {a.model} at S={a.size}")
        step, model = make_model_step(a.model, a.size), a.model
    else:
        step, model = None, None
    res = run(image_size=a.size, num_frames=a.frames, batch_size=a.batch, workers=a.workers, batches=a.batches,
              source_kind=a.source, n_cases=a.cases, phantom_shape=a.shape, cache_size=a.cache, model_step=step,
              model_batches=a.model_batches, overlap_batches=a.overlap_batches)
    res["config"]["model"] = model
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
