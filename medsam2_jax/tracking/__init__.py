"""Tracking an object through a sequence of frames (video, slices of a volume, an unordered image set).

Design (see the README's design section):

1. **Batched encoding** (:mod:`.encode`). The image encoder never reads memory, so every frame of a sequence
   is encoded in a few batched calls (:func:`encode_frames`) before tracking starts.
2. **Prompted frames first** (:func:`conditioning_outputs`). Every prompted ("conditioning") frame is
   segmented from its own prompt with no memory, as SAM 2's video predictor does, and encoded into a
   conditioning memory. Up to ``max_cond_frames`` such frames per object in static slots (:mod:`.prompts`;
   ``cond_slots="fit"``: as many slots as the most-prompted object needs, ``"max"``: always all).
3. **One ``lax.scan`` over a static-length schedule** (:mod:`.scan`). Each step reads the memory
   (conditioning slots, the bank of non-conditioning memories, object pointers), runs memory attention, the
   SAM heads and the memory encoder, and updates the bank. Everything is a fixed-size array with validity
   masks, so nothing recompiles as memory fills and memory held is bounded by the bank size. ``forward`` /
   ``backward`` run T steps (steps past the end are skipped by a ``lax.cond``); ``both`` runs forward from
   the first prompted frame, then, with a fresh bank, backward from it, in T + 1 steps.
4. **Objects are a batch.** Every per-object quantity carries a leading object axis; the bank functions are
   ``vmap``-ped over it.

The non-conditioning memory is a :class:`medsam2_jax.memory.bank.Bank`: ``fifo`` equals SAM 2's video
predictor, ``self_sorting`` is the paper's self-sorting memory bank. Precision (:mod:`.precision`): float32
by default with stored memories rounded to bfloat16 as SAM 2 stores them; :func:`cast_model` /
:func:`compute_model` make the image encoder or the whole model compute in bfloat16.

Modules: :mod:`.config` (settings, directions), :mod:`.prompts`, :mod:`.encode` (encoding and the encoded
features' helpers), :mod:`.scan` (the propagation), :mod:`.run` (jitted entry points, :func:`track`),
:mod:`.precision`. Every public name is re-exported here (``tracking.propagate``, ``tracking.TrackerConfig``).
"""

from ..memory import bank as bank_lib  # noqa: F401  (tracking.bank_lib.BankConfig)
from .config import DIRECTIONS, Array, Direction, TrackerConfig, check_direction  # noqa: F401
from .encode import (  # noqa: F401
    ENCODE_AXIS,
    _encode_chunk,
    _encode_chunk_jit,
    _sharded_encoder,
    as_frames,
    bucketed,
    concat_frames,
    encode_devices,
    encode_frames,
    pad_frames,
    stack_features,
    take_frames,
)
from .precision import BF16_MODULES, COMPUTE_SCOPES, WHOLE_MODEL, cast_model, compute_model  # noqa: F401
from .prompts import Prompts, _num_real_points, check_tracker_prompts, make_prompts  # noqa: F401
from .run import (  # noqa: F401
    TRACE_COUNTS,
    _propagate_jit,
    _propagate_many_jit,
    propagate_jit,
    propagate_many,
    run_sequence,
    track,
)
from .scan import (  # noqa: F401
    MemoryRead,
    conditioning_outputs,
    descriptor_grid,
    initial_carry,
    make_schedule,
    memory_conditioned_features,
    propagate,
    propagate_with_carry,
    read_memory,
)
