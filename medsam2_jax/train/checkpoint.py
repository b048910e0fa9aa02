"""Training checkpoints: orbax ``CheckpointManager`` with the train state, the data iterator and run facts.

A checkpoint at step N holds (one orbax item each):

* ``state``: parameters, optimiser state, step and the PRNG key's data (float32; sharded arrays are written
  by every process for its shards, as orbax does on multi-host runs);
* ``data``: the grain iterator's state (each process's own, via grain's orbax handler), so that the resumed
  run reads exactly the batches the uninterrupted one would;
* ``meta``: what makes a checkpoint compatible (model, image size, frames, global batch, the optimiser's
  structure) and the step, as JSON.

:func:`check_compatible` compares a run's facts with a checkpoint's before anything is written, so a wrong
``--workdir`` or config fails with a message naming the field and leaves the workdir as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .step import TrainState

#: Facts that must match between a checkpoint and the run that resumes from it.
COMPAT_FIELDS = ("model", "image_size", "num_frames", "batch_size", "freeze", "lr_multipliers", "max_cond_frames")


class CheckpointMismatch(ValueError):
    """A checkpoint that the current config cannot resume from (another model, size, batch, ...)."""


def run_facts(config) -> dict:
    return {
        "model": str(config.model),
        "image_size": int(config.image_size),
        "num_frames": int(config.num_frames),
        "batch_size": int(config.batch_size),
        "freeze": sorted(str(f) for f in config.freeze),
        "lr_multipliers": {str(k): float(v) for k, v in dict(config.lr_multipliers).items()},
        "max_cond_frames": int(config.tracker.max_cond_frames),
    }


class Checkpoints:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self._max_to_keep = max_to_keep
        self._mngr = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._mngr is None:
            self._mngr = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True))
        return self._mngr

    def latest_step(self) -> int | None:
        if not self.directory.exists():
            return None
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta"
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises several kinds for a damaged folder
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: {e}); it is "
                f"corrupt or not a medsam2-jax training checkpoint (looked for {path}). Move it away or use "
                "another --workdir") from e

    def check_compatible(self, step: int, facts: dict) -> dict:
        meta = self.read_meta(step)
        saved = meta.get("facts", {})
        for k in COMPAT_FIELDS:
            if k in facts and saved.get(k) != facts[k]:
                raise CheckpointMismatch(
                    f"the checkpoint at step {step} in {self.directory} was trained with {k}={saved.get(k)!r}, "
                    f"but the config asks for {k}={facts[k]!r}; resume with the same {k} "
                    f"(--config.{k}=...) or start a new run in another --workdir")
        return meta

    def save(self, state: TrainState, data_iterator, facts: dict, *, force: bool = False) -> int:
        step = int(jax.device_get(state.step))
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                "key": jax.random.key_data(state.key)}
        import grain

        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({"step": step, "facts": facts}),
        ), force=force)
        self.manager.wait_until_finished()
        return step

    def restore(self, step: int, state: TrainState, shardings: TrainState, data_iterator) -> TrainState:
        """Restore into the structure (and shardings) of ``state``; the iterator is restored in place."""
        import grain

        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                "key": jax.random.key_data(state.key)}
        sh = {"step": shardings.step, "params": shardings.params, "opt_state": shardings.opt_state,
              "key": shardings.step}
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ))
        except Exception as e:
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} does not fit this run ({type(e).__name__}: {e}); it "
                "holds another model or optimiser, or is damaged. Use the config it was trained with, or "
                "another --workdir") from e
        r = out["state"]
        return TrainState(step=r["step"], params=r["params"], opt_state=r["opt_state"],
                          key=jax.random.wrap_key_data(r["key"]))

    def close(self) -> None:
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
