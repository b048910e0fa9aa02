"""Errors for bad input data, and the collector that turns them into logged skips.

Every problem with an input file (unreadable, wrong shape, NaN voxels, labels that do not match the
image, an unknown modality, ...) raises :class:`DataError`, a ``ValueError`` whose message starts with
the file it concerns and says what was found and what was expected. Nothing is silently repaired.

Whether a bad case stops the run or is skipped is a configuration choice (``on_error: "raise" | "skip"``).
:class:`SkipReport` implements it: in ``"raise"`` mode it re-raises, in ``"skip"`` mode it logs a warning,
records the case and lets the caller move on; :meth:`SkipReport.summary` lists every skipped case at the
end of a run::

    report = SkipReport(on_error="skip")
    for case in cases:
        loaded = report.call(case.image, load_case, case)   # None when the case was skipped
        ...
    print(report.summary())
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, TypeVar

log = logging.getLogger("medsam2_jax.data")

T = TypeVar("T")

ON_ERROR_MODES = ("raise", "skip")


def _source_name(source: Any) -> str:
    if source is None:
        return "<in-memory array>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source)


class DataError(ValueError):
    """A problem with one input file.

    The message is ``"<file>: <problem>; expected <expected>"``. ``source`` is the file (or a
    description such as ``"<in-memory array>"`` for arrays that never were a file), ``problem`` what was
    found and ``expected`` what would have been accepted.
    """

    def __init__(self, source: Any, problem: str, expected: str | None = None):
        self.source = _source_name(source)
        self.problem = problem
        self.expected = expected
        msg = f"{self.source}: {problem}"
        if expected:
            msg += f"; expected {expected}"
        super().__init__(msg)

    def __reduce__(self):  # picklable across grain worker processes
        return (type(self), (self.source, self.problem, self.expected))


class EmptyLabelsError(DataError):
    """A label map without any foreground voxel (a case with nothing to segment)."""


@dataclasses.dataclass(frozen=True)
class SkippedCase:
    """One case left out in ``"skip"`` mode: the file and the error message."""

    source: str
    reason: str
    error_type: str


class SkipReport:
    """Applies the ``on_error`` policy to :class:`DataError` s and lists the skipped cases.

    Only :class:`DataError` is handled: any other exception is a bug and always propagates.
    """

    def __init__(self, on_error: str = "raise"):
        if on_error not in ON_ERROR_MODES:
            raise ValueError(f"on_error={on_error!r} is not a mode; expected one of {ON_ERROR_MODES}")
        self.on_error = on_error
        self.skipped: list[SkippedCase] = []

    def handle(self, error: DataError, case: Any = None) -> None:
        """Re-raise ``error`` (``"raise"``) or log and record it (``"skip"``)."""
        if not isinstance(error, DataError):
            raise TypeError(f"SkipReport.handle takes a DataError, got {type(error).__name__}") from error
        if self.on_error == "raise":
            raise error
        source = _source_name(case) if case is not None else error.source
        self.skipped.append(SkippedCase(source, str(error), type(error).__name__))
        log.warning("skipping %s: %s", source, error)

    @contextlib.contextmanager
    def guard(self, case: Any = None) -> Iterator[None]:
        """``with report.guard(case): ...`` — a DataError inside the block is raised or recorded."""
        try:
            yield
        except DataError as e:
            self.handle(e, case)

    def call(self, case: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or ``None`` when it raised a DataError and the case was skipped."""
        try:
            return fn(*args, **kwargs)
        except DataError as e:
            self.handle(e, case)
            return None

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """A human-readable list of the skipped cases (one line each)."""
        if not self.skipped:
            return "no case skipped"
        lines = [f"{len(self.skipped)} case(s) skipped:"]
        lines += [f"  - {s.source}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)
