"""An independent plain-NumPy (float64, Python lists) statement of the paper's eqs. 2–5 and SAM 2's FIFO,
written from the paper's text, not from medsam2_jax.memory.bank. Used only by tests/test_bank.py.

A bank is a Python list of entries (dicts with frame, desc, conf, stamp); order means nothing.
"""

from __future__ import annotations

import numpy as np


def cos(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(a @ b / (max(np.linalg.norm(a), 1e-12) * max(np.linalg.norm(b), 1e-12)))


def total_dissimilarity(descs) -> list[float]:
    """Eq. 2, with two explicit loops."""
    out = []
    for i, ei in enumerate(descs):
        out.append(sum(1.0 - cos(ei, ej) for j, ej in enumerate(descs) if j != i))
    return out


class RefBank:
    def __init__(self, k: int):
        self.k = k
        self.entries: list[dict] = []
        self.clock = 0

    def frames(self) -> set[int]:
        return {e["frame"] for e in self.entries}

    def offer(self, frame, desc, conf, *, policy="self_sorting", use_threshold=True, use_dissimilarity=True,
              c_thresh=0.5, tie_tol=0.0):
        """One update. Returns the set of frames that eq. 3 could drop within `tie_tol` of the minimum
        total dissimilarity (None when no dissimilarity choice was made); the caller resolves near ties."""
        new = {"frame": frame, "desc": np.asarray(desc, np.float64), "conf": float(conf), "stamp": self.clock}
        gate = policy == "self_sorting" and use_threshold
        if gate and not (conf >= c_thresh):
            return None  # eq. 3 "else" branch: M_t = M_{t-1}
        self.clock += 1
        if len(self.entries) < self.k:
            self.entries.append(new)  # a free slot: every valid candidate is kept by TopK
            return None
        cands = self.entries + [new]
        if policy == "fifo" or not use_dissimilarity:
            oldest = min(cands, key=lambda e: e["stamp"])
            self.entries = [e for e in cands if e is not oldest]
            return None
        self.last_candidates = cands
        d = total_dissimilarity([e["desc"] for e in cands])
        # TopK (eq. 3): sort by decreasing D, then older first (the documented tie rule); keep K.
        order = sorted(range(len(cands)), key=lambda i: (-d[i], cands[i]["stamp"]))
        self.entries = [cands[i] for i in order[: self.k]]
        dmin = min(d)
        near = {cands[i]["frame"] for i in range(len(cands)) if d[i] <= dmin + tie_tol}
        return near

    def force(self, frames: set[int]):
        """Adopt a kept set chosen among the last candidates (to follow the implementation through a
        float near tie, where float32 and float64 may legitimately differ)."""
        pool = {e["frame"]: e for e in self.last_candidates}
        self.entries = [pool[f] for f in frames]


def probabilities(descs, query, weighting="linear", eps=1e-6, temperature=1.0) -> np.ndarray:
    """Eq. 4 over the given entries (linear: clamped at eps; softmax: softmax(cos / T))."""
    s = np.array([cos(query, e) for e in descs], np.float64)
    if weighting == "linear":
        w = np.maximum(s, eps)
    else:
        w = np.exp((s - s.max()) / temperature)
    return w / w.sum()


def sam2_nonconditioning_memories(frame_idx: int, stored: set[int], num_maskmem: int = 7) -> dict[int, int]:
    """SAM 2's rule (stride 1, forward): {frame: t_rel} of the non-conditioning memories read at
    `frame_idx`, given the frames whose non-conditioning outputs are stored. Restated from SAM 2's
    documented behaviour: t_rel = 1..num_maskmem-1 frames back; missing frames (e.g. prompted ones) are
    skipped."""
    out = {}
    for t_rel in range(1, num_maskmem):
        prev = frame_idx - t_rel
        if prev in stored:
            out[prev] = t_rel
    return out
