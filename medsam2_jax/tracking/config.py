"""The tracker's static settings (:class:`TrackerConfig`) and the propagation directions."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax

from ..memory import bank as bank_lib

Array = jax.Array
Direction = Literal["forward", "backward", "both"]
DIRECTIONS = ("forward", "backward", "both")


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Static settings of the tracker (hashable: a change recompiles, data never does)."""

    max_cond_frames: int = 4  # prompted frames per object, at most
    # Conditioning slots of make_prompts: "fit" = as many as the most-prompted object has (memory attention
    # reads no empty slot: one prompted frame costs what it costs SAM 2; a new count of prompted frames
    # compiles once more), "max" = always max_cond_frames (one compile whatever the count, more work).
    cond_slots: str = "fit"
    max_points: int = 8  # clicks per prompted frame, box corners included (static slots)
    bank: bank_lib.BankConfig = dataclasses.field(default_factory=bank_lib.BankConfig)
    # SAM 2's video predictor stores memory features in bfloat16; round them the same way (halves memory).
    store_memory_bf16: bool = True
    descriptor_grid: int = 4  # self-sorting bank: frame descriptor = image embedding averaged over g x g cells
    encode_batch: int = 8  # frames per image-encoder call (per device)
    # Local devices the image encoder's batches are split over (0 = all; see encode_frames). Tracking then
    # runs on the first of them. On CPU, N virtual devices (jax_num_cpu_devices) keep the cores busier.
    encode_devices: int = 1
    remat: bool = False  # rematerialise each step in the backward pass (training long sequences)
    # Skip steps where no object is active with a lax.cond. Under vmap (a batch of sequences, as in training)
    # the predicate is batched, so both branches run and every operand, the weights included, is broadcast
    # per sequence; training turns this off (inactive steps are then computed and dropped: same result).
    skip_inactive: bool = True
    # Training: every step also returns all four candidate masks of the decoder (``candidates``) for SAM 2's
    # best-mask loss; with ``dropout`` memory attention runs its dropout (0.1), one key per scan step.
    train: bool = False
    dropout: bool = False

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"TrackerConfig.{field}: got {getattr(self, field)!r}, expected {expected}")

        for name in ("max_cond_frames", "max_points", "descriptor_grid", "encode_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "an int >= 1")
        if not isinstance(self.encode_devices, int) or isinstance(self.encode_devices, bool) or \
                self.encode_devices < 0:
            bad("encode_devices", "an int >= 0 (0 = all local devices)")
        if self.cond_slots not in ("fit", "max"):
            bad("cond_slots", "'fit' or 'max'")
        if not isinstance(self.bank, bank_lib.BankConfig):
            bad("bank", "a memory.bank.BankConfig")


def check_direction(direction: Any) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward', 'backward' or 'both', got {direction!r}")
