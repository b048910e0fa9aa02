"""Balanced task -> modality -> sample selection and T-frame sequences (paper §4.3).

The paper: "we uniformly select tasks ..., starting with a random task selection, then narrowing the pool
to data associated with that task. We proceed by selecting an image modality available for the task,
refining the pool to ensure homogeneity, and finally selecting a sample from the filtered set", and
"sampling 8-frame sequences". So a case is drawn in three uniform steps: a task among all tasks, a modality
among that task's modalities, a case among that (task, modality) pool. Case i's probability is therefore
``1/n_tasks * 1/n_modalities(task) * 1/|pool(task, modality)|`` (:meth:`BalancedSampler.case_probabilities`),
whatever the sizes of the datasets.

Within a case, the target (one binary mask of the preprocessed case; ``preprocess`` splits classes and
connected components) is chosen by ``target_choice``: ``"class"`` (default) picks a class uniformly among
the classes present, then one of its components uniformly, so a class split into many pieces is not
over-sampled; ``"target"`` picks any target uniformly.

3D sequences (``sample_window``): T slices ``start, start + d*k, ..., start + d*k*(T-1)`` with stride k
(uniform in ``stride``, default 1: the paper gives none) and direction d = -1 with probability
``reverse_prob``. The default 0.5 comes from appendix C.2's "flipped along all axes with a probability of
0.5": for a slice sequence the slice axis is the time axis, so its flip is the reversed sequence. The first
frame must contain the target (>= ``min_first_frame_area`` pixels), as the initial prompt is drawn there;
``start`` is uniform over the slices that allow a full window inside the volume, and only when there is
none (a short volume, or a target at the far end), over all slices with the target, the frames that fall
outside the volume then being padding (index -1, ``frame_valid`` False).

2D cases (a single slice) make a sequence of T different images (the paper's one-prompt setting: a
template and query images of the same task): frame 0 is the drawn case, frames 1..T-1 are drawn uniformly
(with replacement) from the same (task, modality) pool, and the target of every frame is the union of the
chosen class's components in that image (empty where the image lacks the class).

Everything is deterministic given the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class CaseInfo:
    """What balanced sampling needs to know about a case without loading it."""

    task: str
    modality: str
    dim: int = 3  # 3: a volume (sequences are slices); 2: one image (sequences are images of the pool)
    name: str = ""

    def __post_init__(self):
        if self.dim not in (2, 3):
            raise ValueError(f"CaseInfo.dim must be 2 or 3, got {self.dim!r} (case {self.name!r})")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    num_frames: int = 8
    stride: Tuple[int, int] = (1, 1)  # inclusive range, drawn uniformly per sequence
    reverse_prob: float = 0.5
    min_first_frame_area: int = 1
    target_choice: str = "class"  # "class" then component, or "target"
    max_attempts: int = 10  # redraws when a drawn case has no usable target

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"SamplingConfig.num_frames must be >= 1, got {self.num_frames}")
        lo, hi = self.stride
        if not 1 <= lo <= hi:
            raise ValueError(f"SamplingConfig.stride must be (low, high) with 1 <= low <= high, got {self.stride!r}")
        object.__setattr__(self, "stride", (int(lo), int(hi)))
        if not 0.0 <= self.reverse_prob <= 1.0:
            raise ValueError(f"SamplingConfig.reverse_prob must be in [0, 1], got {self.reverse_prob!r}")
        if self.min_first_frame_area < 1:
            raise ValueError(f"SamplingConfig.min_first_frame_area must be >= 1, got {self.min_first_frame_area}")
        if self.target_choice not in ("class", "target"):
            raise ValueError(f"SamplingConfig.target_choice must be 'class' or 'target', got {self.target_choice!r}")
        if self.max_attempts < 1:
            raise ValueError(f"SamplingConfig.max_attempts must be >= 1, got {self.max_attempts}")


class BalancedSampler:
    """Uniform task, then uniform modality of that task, then uniform case of that (task, modality) pool."""

    def __init__(self, infos: Sequence[CaseInfo]):
        if len(infos) == 0:
            raise ValueError("BalancedSampler: infos is empty, there is no case to sample")
        self.infos = tuple(infos)
        self.tasks: Tuple[str, ...] = tuple(sorted({i.task for i in infos}))
        self.modalities = {t: tuple(sorted({i.modality for i in infos if i.task == t})) for t in self.tasks}
        pools: dict = {}
        for idx, info in enumerate(infos):
            pools.setdefault((info.task, info.modality), []).append(idx)
        self.pools = {k: np.asarray(v, np.int64) for k, v in pools.items()}

    def draw(self, rng: np.random.Generator) -> int:
        task = self.tasks[rng.integers(len(self.tasks))]
        mods = self.modalities[task]
        pool = self.pools[(task, mods[rng.integers(len(mods))])]
        return int(pool[rng.integers(pool.size)])

    def pool_of(self, case_index: int) -> np.ndarray:
        info = self.infos[case_index]
        return self.pools[(info.task, info.modality)]

    def case_probabilities(self) -> np.ndarray:
        """Exact probability of :meth:`draw` returning each case."""
        p = np.zeros(len(self.infos))
        for task in self.tasks:
            for mod in self.modalities[task]:
                pool = self.pools[(task, mod)]
                p[pool] += 1.0 / (len(self.tasks) * len(self.modalities[task]) * pool.size)
        return p

    def task_index(self, case_index: int) -> int:
        return self.tasks.index(self.infos[case_index].task)

    def modality_index(self, case_index: int) -> int:
        info = self.infos[case_index]
        return self.modalities[info.task].index(info.modality)


def choose_target(class_ids: Sequence[int], rng: np.random.Generator, how: str = "class") -> int:
    """Index of the chosen target given each target's class id (see ``target_choice``)."""
    class_ids = np.asarray(class_ids)
    if class_ids.size == 0:
        raise ValueError("choose_target: class_ids is empty, the case has no target")
    if how == "target":
        return int(rng.integers(class_ids.size))
    if how != "class":
        raise ValueError(f"choose_target: how must be 'class' or 'target', got {how!r}")
    classes = np.unique(class_ids)
    chosen = classes[rng.integers(classes.size)]
    members = np.flatnonzero(class_ids == chosen)
    return int(members[rng.integers(members.size)])


def sample_window(
    area: np.ndarray,
    num_frames: int,
    rng: np.random.Generator,
    *,
    stride: Tuple[int, int] = (1, 1),
    reverse_prob: float = 0.5,
    min_area: int = 1,
) -> Tuple[np.ndarray, bool, int]:
    """Slice indices ``(T,)`` (-1 = padding past the volume), whether reversed, and the stride.

    ``area`` (n,) is the target's pixel count per slice.
    """
    area = np.asarray(area)
    if area.ndim != 1:
        raise ValueError(f"sample_window: area must be 1D (n_slices,), got shape {area.shape}")
    n = area.size
    starts = np.flatnonzero(area >= min_area)
    if starts.size == 0:
        raise ValueError(f"sample_window: no slice has a target area >= min_area={min_area}")
    k = int(rng.integers(stride[0], stride[1] + 1))
    reverse = bool(rng.random() < reverse_prob)
    step = -k if reverse else k
    span = k * (num_frames - 1)
    full = starts[starts - span >= 0] if reverse else starts[starts + span <= n - 1]
    pool = full if full.size else starts
    start = int(pool[rng.integers(pool.size)])
    frames = start + step * np.arange(num_frames)
    frames = np.where((frames >= 0) & (frames < n), frames, -1).astype(np.int32)
    return frames, reverse, k


@dataclasses.dataclass
class DrawnSequence:
    """A drawn sequence before augmentation and prompts."""

    images: np.ndarray  # (T, S, S, C) float32
    masks: np.ndarray  # (T, S, S) bool
    frame_index: np.ndarray  # (T,) int32, -1 = padding
    frame_valid: np.ndarray  # (T,) bool
    case_index: np.ndarray  # (T,) int32
    class_id: int
    component_id: np.ndarray  # (T,) int32 (-1 where the frame's target is a class union or absent)
    reversed: bool
    stride: int
    independent_frames: bool  # True for 2D sequences of different images


def _target_arrays(case) -> Tuple[np.ndarray, list]:
    targets = list(case.targets)
    return np.asarray([int(t.class_id) for t in targets], np.int64), targets


def draw_sequence(
    case_index: int,
    get_case: Callable[[int], object],
    sampler: BalancedSampler,
    rng: np.random.Generator,
    cfg: SamplingConfig = SamplingConfig(),
) -> Optional[DrawnSequence]:
    """Build one sequence from case ``case_index`` (None if it has no usable target).

    ``get_case(i)`` returns an object with ``.image`` (n, S, S, C) and ``.targets``, each target having
    ``.class_id``, ``.component_id`` and ``.mask`` (n, S, S) bool (the interface of
    ``preprocess.Preprocessed``).
    """
    case = get_case(case_index)
    image = np.asarray(case.image)
    if image.ndim != 4 or image.shape[1] != image.shape[2]:
        raise ValueError(f"case {case_index}: image must have shape (n, S, S, C), got {image.shape}")
    class_ids, targets = _target_arrays(case)
    # Choose among the class ids first and build only the chosen target's mask (preprocess computes masks
    # on demand from an instance map; a CT with ~100 targets would otherwise build them all per draw).
    # A target too small for ``min_first_frame_area`` is set aside and the choice is made again.
    candidates = list(range(len(targets)))
    j = area = mask_j = None
    while candidates:
        pick = candidates[choose_target(class_ids[candidates], rng, cfg.target_choice)]
        m = np.asarray(targets[pick].mask, bool)
        if m.shape != image.shape[:3]:
            raise ValueError(f"case {case_index}: target mask has shape {m.shape}, expected {image.shape[:3]}")
        a = m.reshape(image.shape[0], -1).sum(axis=1)
        if a.max() >= cfg.min_first_frame_area:
            j, area, mask_j = pick, a, m
            break
        candidates.remove(pick)
    if j is None:
        return None
    T = cfg.num_frames
    if sampler.infos[case_index].dim == 2:
        if image.shape[0] != 1:
            raise ValueError(f"case {case_index}: a 2D case must have one slice, got image shape {image.shape}")
        cls = int(class_ids[j])
        pool = sampler.pool_of(case_index)
        others = pool[rng.integers(pool.size, size=T - 1)] if T > 1 else np.zeros(0, np.int64)
        frames_cases = [case_index, *[int(o) for o in others]]
        imgs, msks, comps = [], [], []
        for ci in frames_cases:
            c = case if ci == case_index else get_case(ci)
            img_c = np.asarray(c.image)
            if img_c.shape[1:] != image.shape[1:] or img_c.shape[0] != 1:
                raise ValueError(
                    f"case {ci}: a 2D case of the pool of case {case_index} has image shape {img_c.shape}, "
                    f"expected {(1,) + image.shape[1:]}"
                )
            m = np.zeros(image.shape[1:3], bool)
            for t in c.targets:
                if int(t.class_id) == cls:
                    m |= np.asarray(t.mask, bool)[0]
            imgs.append(img_c[0])
            msks.append(m)
            comps.append(-1)
        return DrawnSequence(
            images=np.stack(imgs).astype(np.float32),
            masks=np.stack(msks),
            frame_index=np.zeros(T, np.int32),
            frame_valid=np.ones(T, bool),
            case_index=np.asarray(frames_cases, np.int32),
            class_id=cls,
            component_id=np.asarray(comps, np.int32),
            reversed=False,
            stride=0,
            independent_frames=True,
        )
    frames, reverse, k = sample_window(
        area, T, rng, stride=cfg.stride, reverse_prob=cfg.reverse_prob, min_area=cfg.min_first_frame_area
    )
    valid = frames >= 0
    safe = np.where(valid, frames, 0)
    imgs = image[safe].astype(np.float32)
    msks = mask_j[safe]
    if not valid.all():
        fill = imgs[valid].min(axis=(0, 1, 2))  # per-channel background of the real frames
        imgs[~valid] = fill
        msks[~valid] = False
    return DrawnSequence(
        images=imgs,
        masks=msks,
        frame_index=frames,
        frame_valid=valid,
        case_index=np.full(T, case_index, np.int32),
        class_id=int(class_ids[j]),
        component_id=np.full(T, int(targets[j].component_id), np.int32),
        reversed=reverse,
        stride=k,
        independent_frames=False,
    )


def draw_balanced_sequence(
    get_case: Callable[[int], object],
    sampler: BalancedSampler,
    rng: np.random.Generator,
    cfg: SamplingConfig = SamplingConfig(),
) -> DrawnSequence:
    """Balanced case draw + :func:`draw_sequence`, redrawing (up to ``max_attempts``) past cases with no
    usable target; raises ``ValueError`` naming the cases if every attempt fails."""
    tried: List[int] = []
    for _ in range(cfg.max_attempts):
        idx = sampler.draw(rng)
        seq = draw_sequence(idx, get_case, sampler, rng, cfg)
        if seq is not None:
            return seq
        tried.append(idx)
    names = [sampler.infos[i].name or str(i) for i in tried]
    raise ValueError(
        f"draw_balanced_sequence: {cfg.max_attempts} drawn cases had no target with >= "
        f"{cfg.min_first_frame_area} pixels on a slice: {names}"
    )
