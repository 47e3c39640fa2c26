"""The run's wall-clock budget, shared out among the cases and cells as the run goes, so that a default run ends in a
known time even on a slow or shared machine, with every workload and peer still in the report.

Sharing: each case (workload size) gets the time left divided by the cases left, so every workload gets its
turn and the time a fast case does not use goes to the later ones; within a case, a cell's fair share is the
case's time left divided by its cells left. Repeats fill at most the fair share (never more than
``Options.cell_budget_s``). One call may take up to ``stretch`` fair shares, within what is left of the case:
big problems need more than an equal share, and what must be stopped is the runaway call (a peer cell that took
657 s on a shared machine, 18 s on a quiet one). A call predicted under ``MIN_CALL_S`` always runs: it costs
little, and a refusal (unsupported input) is better reported than guessed.

Prediction, the way memory is predicted before a cell is tried: a call's time is the peer's model time
(peers.predicted_seconds, from the square-matmul rate measured at the start) times what this peer's latest first
call measured against its model in this run, plus its latest compile time for a peer that compiles per shape
(FlexAttention), so a machine that got slower, or a peer the model flatters, is predicted as it is now. A peer not
yet measured gets the model alone: one peer's ratio says little about another's, and calls under
``LEARN_FROM_S`` measure per-call overhead rather than speed. A call predicted over its limit
never starts; one that ran over it ends its cell. Either way the cell reads ``too slow`` with both numbers.
"""
from __future__ import annotations

import math
import time
from typing import Optional

LEARN_FROM_S = 0.05
MIN_CALL_S = 0.5


class TimeBudget:
    """``total_s`` seconds (``math.inf``: unlimited) from now for ``cases`` cases."""

    def __init__(self, total_s: float = math.inf, cases: int = 1, stretch: float = 4.0):
        self.total_s, self.stretch = total_s, stretch
        self.end = time.perf_counter() + total_s
        self.cases_left = max(1, cases)
        self.case_end, self.cells_left = self.end, 1
        self._ratio: dict[str, float] = {}    # peer name -> measured / model seconds of its latest first call
        self._compile: dict[str, float] = {}  # peer name -> seconds of its latest compile

    @property
    def limited(self) -> bool:
        return math.isfinite(self.total_s)

    def start_case(self, cells: int) -> None:
        now = time.perf_counter()
        self.case_end = now + max(0.0, self.end - now) / self.cases_left
        self.cells_left = max(1, cells)

    def end_case(self) -> None:
        self.cases_left = max(1, self.cases_left - 1)

    def case_left_s(self) -> float:
        return max(0.0, self.case_end - time.perf_counter()) if self.limited else math.inf

    def share_s(self, cells: int = 1) -> float:
        """The fair share of ``cells`` of the case's cells left."""
        return self.case_left_s() * cells / max(self.cells_left, cells) if self.limited else math.inf

    def call_limit_s(self) -> float:
        """The longest one call of the case's next cell may take."""
        return max(MIN_CALL_S, min(self.case_left_s(), self.stretch * self.share_s()))

    def done(self, cells: int) -> None:
        self.cells_left = max(1, self.cells_left - cells)

    def predict_s(self, peer: str, model_s: float) -> float:
        return model_s * self._ratio.get(peer, 1.0) + self._compile.get(peer, 0.0)

    def learn(self, peer: str, model_s: float, measured_s: float, compile_s: Optional[float] = None) -> None:
        if model_s > 0 and measured_s >= LEARN_FROM_S:
            self._ratio[peer] = measured_s / model_s
        if compile_s is not None:
            self._compile[peer] = compile_s

    def too_slow(self, seconds: float, limit_s: float, predicted: bool) -> Optional[str]:
        """The cell's reason when ``seconds`` is over ``limit_s``, else None."""
        if seconds <= limit_s:
            return None
        if predicted:
            return f"one call predicted {seconds:.1f} s (budget {limit_s:.1f} s), not run"
        return f"one call took {seconds:.1f} s (budget {limit_s:.1f} s)"
