"""The run's wall-clock budget, shared out among the cells as the run goes, so that a default run ends in a
known time even on a slow or shared machine, with every workload and peer still in the report.

Sharing: a cell's fair share is the time left divided by the cells left to run, so the time a fast cell does not
use goes to the later ones. Repeats fill at most the fair share (never more than ``Options.cell_budget_s``).
One call may take up to ``stretch`` fair shares: big problems need more than an equal share, and what must be
stopped is the runaway call (a peer cell that took 657 s on a shared machine, 18 s on a quiet one).

Prediction, the way memory is predicted before a cell is tried: a call's time is the peer's model time
(peers.predicted_seconds, from the square-matmul rate measured at the start) times what this peer's latest first
call measured against its model in this run, so a machine that got slower, or a peer the model flatters, is
predicted as it is now. A peer not yet measured gets the model alone: one peer's ratio says little about another's,
and calls under ``LEARN_FROM_S`` measure per-call overhead rather than speed. A call predicted over its limit
never starts; one that ran over it ends its cell. Either way the cell reads ``too slow`` with both numbers.
"""
from __future__ import annotations

import math
import time
from typing import Optional

LEARN_FROM_S = 0.05


class TimeBudget:
    """``total_s`` seconds (``math.inf``: unlimited) from now for ``cells`` cells."""

    def __init__(self, total_s: float = math.inf, cells: int = 1, stretch: float = 4.0):
        self.total_s, self.stretch = total_s, stretch
        self.end = time.perf_counter() + total_s
        self.cells_left = max(1, cells)
        self._ratio: dict[str, float] = {}  # peer name -> measured / model seconds of its latest first call

    @property
    def limited(self) -> bool:
        return math.isfinite(self.total_s)

    def left_s(self) -> float:
        return max(0.0, self.end - time.perf_counter())

    def share_s(self, cells: int = 1) -> float:
        """The fair share of ``cells`` of the cells left."""
        return self.left_s() * cells / max(self.cells_left, cells) if self.limited else math.inf

    def call_limit_s(self) -> float:
        """The longest one call of the next cell may take."""
        return self.stretch * self.share_s()

    def done(self, cells: int) -> None:
        self.cells_left = max(1, self.cells_left - cells)

    def predict_s(self, peer: str, model_s: float) -> float:
        return model_s * self._ratio.get(peer, 1.0)

    def learn(self, peer: str, model_s: float, measured_s: float) -> None:
        if model_s > 0 and measured_s >= LEARN_FROM_S:
            self._ratio[peer] = measured_s / model_s

    def too_slow(self, seconds: float, limit_s: float, predicted: bool) -> Optional[str]:
        """The cell's reason when ``seconds`` is over ``limit_s``, else None."""
        if seconds <= limit_s:
            return None
        if predicted:
            return f"one call predicted {seconds:.1f} s (budget {limit_s:.1f} s), not run"
        return f"one call took {seconds:.1f} s (budget {limit_s:.1f} s)"
