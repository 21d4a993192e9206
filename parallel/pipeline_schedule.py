"""Pipeline schedules as pure functions: for each stage, the ordered list of actions it performs in one step.

An action is a forward or backward of one micro-batch (`F`, `B`), or moving a boundary tensor to or from a
neighbouring stage: `SEND_F`/`RECV_F` carry activations downstream, `SEND_B`/`RECV_B` carry activation
gradients upstream. Sends are non-blocking (posted, then waited for at the end of the step); receives block.
Under those semantics both schedules below are deadlock-free, which `pipeline_sim.simulate` checks.

- GPipe: all forwards, then all backwards; every stage holds all m micro-batches' activations at the peak.
- 1F1B (PipeDream-Flush, Megatron's default): stage s runs min(p - s - 1, m) warm-up forwards, then alternates
  one forward and one backward, then drains the remaining backwards; it holds at most p - s micro-batches.
Both have the same bubble, (p - 1) / (m + p - 1) of the step at equal per-stage costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

COMPUTE_OPS = ("F", "B")
COMM_OPS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule: `op` on micro-batch `microbatch`; `peer`: send/recv partner."""

    op: str
    microbatch: int
    peer: int | None = None

    def __str__(self) -> str:
        suffix = "" if self.peer is None else f"@{self.peer}"
        return f"{self.op}{self.microbatch}{suffix}"


def _check(num_stages: int, num_microbatches: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive int, got {num_microbatches!r}")


def _forward(stage: int, num_stages: int, mb: int) -> list[Action]:
    """Receive the activation from the previous stage (unless first), run the forward, send it on."""
    actions = [Action("RECV_F", mb, stage - 1)] if stage > 0 else []
    actions.append(Action("F", mb))
    if stage < num_stages - 1:
        actions.append(Action("SEND_F", mb, stage + 1))
    return actions


def _backward(stage: int, num_stages: int, mb: int) -> list[Action]:
    """Receive the output gradient (the last stage starts from its loss), backward, send the input grad."""
    actions = [Action("RECV_B", mb, stage + 1)] if stage < num_stages - 1 else []
    actions.append(Action("B", mb))
    if stage > 0:
        actions.append(Action("SEND_B", mb, stage - 1))
    return actions


def gpipe(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """All forwards in micro-batch order, then all backwards in the same order, on every stage."""
    _check(num_stages, num_microbatches)
    schedule = []
    for s in range(num_stages):
        actions = []
        for mb in range(num_microbatches):
            actions += _forward(s, num_stages, mb)
        for mb in range(num_microbatches):
            actions += _backward(s, num_stages, mb)
        schedule.append(actions)
    return schedule


def one_f_one_b(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Warm-up forwards, then one-forward-one-backward, then the remaining backwards (PipeDream-Flush)."""
    _check(num_stages, num_microbatches)
    schedule = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        actions = []
        for mb in range(warmup):
            actions += _forward(s, num_stages, mb)
        for i in range(num_microbatches - warmup):
            actions += _forward(s, num_stages, warmup + i)
            actions += _backward(s, num_stages, i)
        for mb in range(num_microbatches - warmup, num_microbatches):
            actions += _backward(s, num_stages, mb)
        schedule.append(actions)
    return schedule


SCHEDULES: dict[str, Callable[[int, int], list[list[Action]]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """The schedule called `name` ("gpipe" or "1f1b") for `num_stages` stages and `num_microbatches`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](num_stages, num_microbatches)
