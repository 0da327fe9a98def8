"""How a run ends other than by finishing, as types shared by the worker loop, `pretrain`, Tune's
trials and the CLI. Nothing heavy is imported here, so the CLI can catch these by class without
loading Ray or torch at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Stop:
    """What a worker loop returns when it stops the run itself. Returned, not raised: Ray Train
    retries a raised worker error from the last checkpoint, which would meet the same NaN or the
    same bad data again. The driver turns it into an error (`pipelines.pretrain.raise_if_stopped`).

    Args:
        reason: `non_finite_loss` (NonFiniteLossError) or `bad_data` (BadDataError).
        message: one line saying what happened, where, and what to change.
    """

    reason: Literal["non_finite_loss", "bad_data"]
    message: str


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class RunInterrupted(RuntimeError):
    """The run was stopped from outside (Ctrl-C, or its Ray going away); the message says what
    was kept and how to resume."""
