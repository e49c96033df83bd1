"""The steps of a training job and the rules of moving between their states.

Steps run in order; each is NOT_STARTED, IN_PROGRESS, FINISHED or FAILED, and only ever moves forward. The overall
status is derived from the steps (any FAILED -> FAILED; all FINISHED -> FINISHED; anything started ->
IN_PROGRESS; else NOT_STARTED) and stored beside them so lists can filter on it.
"""
from __future__ import annotations

from typing import Mapping

DATA_EXTRACTION = "DATA_EXTRACTION"
DATA_EXTRACTION_AND_TRAINING = "DATA_EXTRACTION_AND_TRAINING"
TRAINING = "TRAINING"
TRAINING_AND_TRAINED_MODEL = "TRAINING_AND_TRAINED_MODEL"
TRAINED_MODEL = "TRAINED_MODEL"
STEPS = (DATA_EXTRACTION, DATA_EXTRACTION_AND_TRAINING, TRAINING, TRAINING_AND_TRAINED_MODEL, TRAINED_MODEL)

NOT_STARTED = "NOT_STARTED"
IN_PROGRESS = "IN_PROGRESS"
FINISHED = "FINISHED"
FAILED = "FAILED"
_RANK = {NOT_STARTED: 0, IN_PROGRESS: 1, FINISHED: 2, FAILED: 2}

# Run states that end a pipeline run (KFP's names; the local engine uses SUCCEEDED/FAILED).
RUN_SUCCEEDED = {"SUCCEEDED"}
RUN_FAILED = {"FAILED", "ERROR", "SKIPPED", "TERMINATED", "CANCELED", "CANCELLED"}


class InvalidTransition(Exception):
    """A change that would move a step backwards or skip ahead: callers treat it as 'nothing to do'."""


def initial_steps() -> dict[str, str]:
    return {step: NOT_STARTED for step in STEPS}


def ordered(steps: Mapping[str, str]) -> dict[str, str]:
    """The steps in their order (JSON columns do not keep key order on every backend)."""
    return {step: steps.get(step, NOT_STARTED) for step in STEPS}


def step_in_progress(steps: Mapping[str, str]) -> str | None:
    """The step IN_PROGRESS now, if any."""
    return next((step for step in STEPS if steps.get(step, NOT_STARTED) == IN_PROGRESS), None)


def overall_status(steps: Mapping[str, str]) -> str:
    states = [steps.get(step, NOT_STARTED) for step in STEPS]
    if FAILED in states:
        return FAILED
    if all(s == FINISHED for s in states):
        return FINISHED
    if any(s != NOT_STARTED for s in states):
        return IN_PROGRESS
    return NOT_STARTED


def advance(steps: Mapping[str, str], step: str, state: str) -> dict[str, str]:
    """A copy of `steps` with `step` moved to `state`, or InvalidTransition if that is not forward.

    The steps before `step` must be FINISHED (a step cannot start before its predecessor ended), except that any
    step may fail.
    """
    current = ordered(steps)
    if overall_status(current) == FAILED:
        raise InvalidTransition(f"the job has failed; {step} stays {current[step]}")
    if _RANK[state] <= _RANK[current[step]]:
        raise InvalidTransition(f"{step} is {current[step]} already")
    if state != FAILED:
        before = STEPS[: STEPS.index(step)]
        if any(current[s] != FINISHED for s in before):
            raise InvalidTransition(f"{step} cannot be {state} before the steps ahead of it finished")
    current[step] = state
    return current
