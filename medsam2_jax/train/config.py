"""Validation of a training config: every field checked up front, errors that name the field and what it
accepts (the command line turns them into exit status 2)."""

from __future__ import annotations

import re
from typing import Any

from ..memory.bank import POLICIES
from ..model.sizes import MODEL_NAMES


class ConfigError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"config field '{field}': {message}")
        self.field = field


DTYPES = ("float32", "bfloat16")
SCOPES = ("model", "image_encoder")  # tracking.COMPUTE_SCOPES


def _int(c, field: str, low: int, *, allow: tuple = ()) -> int:
    v = _get(c, field)
    if v in allow and not isinstance(v, bool):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        extra = f" (or {', '.join(map(str, allow))})" if allow else ""
        raise ConfigError(field, f"got {v!r}, expected an int >= {low}{extra}")
    return v


def _float(c, field: str, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    v = _get(c, field)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if low_open else v >= low) and \
        (high is None or v <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(field, f"got {v!r}, expected a number {rng}")
    return float(v)


def _bool(c, field: str) -> bool:
    v = _get(c, field)
    if not isinstance(v, bool):
        raise ConfigError(field, f"got {v!r}, expected True or False")
    return v


def _choice(c, field: str, choices) -> str:
    v = _get(c, field)
    if v not in choices:
        raise ConfigError(field, f"got {v!r}, expected one of {', '.join(map(repr, choices))}")
    return v


def _get(c, field: str) -> Any:
    node = c
    for part in field.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(field, "missing (start the config from configs/base.py's get_config())") from None
    return node


def validate(c) -> None:
    """Raise :class:`ConfigError` for the first field that is wrong."""

    _choice(c, "model", sorted(MODEL_NAMES))
    v = _get(c, "image_size")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 32:
        raise ConfigError("image_size", f"got {v!r}, expected a positive multiple of 32 (256-512 on CPU, 1024 as SAM 2)")
    if not isinstance(_get(c, "init_from"), str):
        raise ConfigError("init_from", "expected a directory path (a string), or '' for random init")
    _choice(c, "compute_dtype", DTYPES)
    _choice(c, "compute_scope", SCOPES)
    for f in ("remat", "dropout", "progress", "data.realct", "data.augment", "bank.use_threshold",
              "bank.use_dissimilarity", "bank.use_resampling"):
        _bool(c, f)
    _int(c, "num_frames", 1)
    _int(c, "batch_size", 1)
    _int(c, "tracker.max_cond_frames", 1)
    _choice(c, "bank.policy", POLICIES)
    _int(c, "bank.K", 1)
    _float(c, "bank.c_thresh", -1e9)
    for f in ("loss.focal", "loss.dice", "loss.iou", "loss.object_score", "weight_decay", "clip_norm",
              "final_lr_fraction"):
        _float(c, f, 0.0)
    _int(c, "total_steps", 1)
    _float(c, "lr", 0.0, low_open=True)
    _int(c, "warmup_steps", 0)
    _int(c, "seed", 0)
    _int(c, "log_every", 1)
    _int(c, "checkpoint_every", 1)
    _int(c, "keep_checkpoints", 1)
    _int(c, "mesh.data", 1, allow=(-1,))
    _int(c, "mesh.fsdp", 1)
    _choice(c, "distributed", ("auto", "on", "off"))
    _choice(c, "compile_in_subprocess", ("auto", "on", "off"))
    mults = _get(c, "lr_multipliers")
    for k, f in dict(mults).items():
        try:
            re.compile(k)
        except re.error as e:
            raise ConfigError("lr_multipliers", f"{k!r} is not a regular expression ({e})") from None
        if isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0:
            raise ConfigError("lr_multipliers", f"{k!r}: got factor {f!r}, expected a number >= 0")
    fr = _get(c, "freeze")
    if isinstance(fr, str) or not all(isinstance(x, str) for x in fr):
        raise ConfigError("freeze", f"got {fr!r}, expected a tuple of module names or path regexes, e.g. "
                                    "\"('image_encoder',)\"")
    for rule in _get(c, "sharding_rules"):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError("sharding_rules", f"got rule {rule!r}, expected (regex, (axis or None, ...))")
        for ax in rule[1]:
            if ax not in (None, "data", "fsdp"):
                raise ConfigError("sharding_rules", f"rule {rule!r}: axis {ax!r} is not a mesh axis (data, fsdp)")
    dirs = _get(c, "data.dataset_dirs")
    if isinstance(dirs, str):
        raise ConfigError("data.dataset_dirs", f"got the string {dirs!r}, expected a tuple of folders, e.g. "
                                               f"\"('{dirs}',)\"")
    _int(c, "data.phantoms", 0)
    _int(c, "eval.phantoms", 0)
    _int(c, "eval.batches", 0)
    if isinstance(_get(c, "eval.dataset_dirs"), str):
        raise ConfigError("eval.dataset_dirs", "expected a tuple of folders")
    _int(c, "data.num_workers", 0)
    _int(c, "data.cache_size", 0)
    _int(c, "data.max_correct_frames", 0)
    for f in ("data.p_mask", "data.p_click", "data.p_box"):
        _float(c, f, 0.0, 1.0)
    if abs(c.data.p_mask + c.data.p_click + c.data.p_box - 1.0) > 1e-6:
        raise ConfigError("data.p_mask", "data.p_mask + data.p_click + data.p_box must be 1, got "
                                         f"{c.data.p_mask + c.data.p_click + c.data.p_box}")
    if not dirs and c.data.phantoms == 0 and not c.data.realct:
        raise ConfigError("data.dataset_dirs", "no training data: give dataset folders, data.phantoms > 0, or "
                                               "data.realct=True")
    if c.tracker.max_cond_frames < min(1 + c.data.max_correct_frames, c.num_frames):
        raise ConfigError("tracker.max_cond_frames",
                          f"got {c.tracker.max_cond_frames}, but the prompted frame plus data.max_correct_frames="
                          f"{c.data.max_correct_frames} corrected frames need {1 + c.data.max_correct_frames}")
