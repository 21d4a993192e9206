"""Pipeline schedules as pure functions: for each stage, the ordered list of actions it performs in one step.

An action is a forward or backward of one micro-batch (`F`, `B`; zero-bubble schedules split the backward into
`B`, the input gradient, and `W`, the weight gradient), or moving a boundary tensor to or from a neighbouring
stage: `SEND_F`/`RECV_F` carry activations downstream, `SEND_B`/`RECV_B` carry activation gradients upstream.
Sends are non-blocking (posted, then waited for at the end of the step); receives block, and messages between
two stages are matched in order (no tags), which `pipeline_sim` checks along with deadlock-freedom.

- GPipe: all forwards, then all backwards; every stage holds all m micro-batches' activations at the peak.
- 1F1B (PipeDream-Flush, Megatron's default): stage s runs min(p - s - 1, m) warm-up forwards, then alternates
  one forward and one backward, then drains the remaining backwards; it holds at most p - s micro-batches.
Both have the same bubble, (p - 1) / (m + p - 1) of the step at equal per-stage costs.
- Interleaved 1F1B: v model chunks per stage, bubble (p - 1) / (v·m + p - 1).
- ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with B and W apart and W deferred into the
  bubbles, at most p micro-batches held per stage (1F1B's peak); at F = B = W and m >= p the bubble is
  (p - 1) / (3m + p - 1): p - 1 idle units per stage, a third of 1F1B's 3(p - 1) (its B being B + W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

COMPUTE_OPS = ("F", "B", "W")
COMM_OPS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule: `op` on micro-batch `microbatch`; `peer`: send/recv partner."""

    op: str
    microbatch: int
    peer: int | None = None
    chunk: int = 0  # the model chunk (virtual stage) of the interleaved schedule; 0 otherwise

    def __str__(self) -> str:
        suffix = "" if self.peer is None else f"@{self.peer}"
        chunk = f"c{self.chunk}" if self.chunk else ""
        return f"{self.op}{self.microbatch}{chunk}{suffix}"


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


def interleaved_one_f_one_b(num_stages: int, num_microbatches: int, num_chunks: int = 2) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron): each stage holds `num_chunks` model chunks, virtual stage c·p + s on stage
    s, so the pipeline is v times deeper but each step v times shorter: the bubble drops to
    (p − 1) / (v·m + p − 1). Micro-batches go through in groups of p (m must be a multiple of p); stage s
    warms up with (p − s − 1)·2 + (v − 1)·p forwards. The last stage's chunk c sends to stage 0's chunk c + 1."""
    _check(num_stages, num_microbatches)
    p, m, v = num_stages, num_microbatches, num_chunks
    if v < 1:
        raise ValueError(f"num_chunks must be >= 1, got {v}")
    if m % p:
        raise ValueError(f"interleaved 1F1B needs num_microbatches ({m}) to be a multiple of num_stages ({p})")
    total = m * v

    def unit(s: int, k: int, forward: bool) -> list[Action]:
        group, within = divmod(k, p * v)
        chunk = within // p if forward else v - 1 - within // p
        mb = group * p + within % p
        vstage = chunk * p + s
        first, last = vstage == 0, vstage == p * v - 1
        prev, nxt = (s - 1) % p, (s + 1) % p
        if forward:
            acts = [] if first else [Action("RECV_F", mb, prev, chunk)]
            acts.append(Action("F", mb, None, chunk))
            return acts if last else [*acts, Action("SEND_F", mb, nxt, chunk)]
        acts = [] if last else [Action("RECV_B", mb, nxt, chunk)]
        acts.append(Action("B", mb, None, chunk))
        return acts if first else [*acts, Action("SEND_B", mb, prev, chunk)]

    schedule = []
    for s in range(p):
        warmup = min((p - s - 1) * 2 + (v - 1) * p, total)
        actions = []
        for k in range(warmup):
            actions += unit(s, k, True)
        for i in range(total - warmup):
            actions += unit(s, warmup + i, True)
            actions += unit(s, i, False)
        for k in range(total - warmup, total):
            actions += unit(s, k, False)
        schedule.append(actions)
    return schedule


def zero_bubble_h1(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """ZB-H1: 1F1B's warm-up (p - s - 1 forwards on stage s), then one F and one B per micro-batch, B (the input
    gradient) sent upstream at once and W (the weight gradient) run s micro-batches late, then the remaining
    B's, each followed by a W, then the remaining W's. Stage s holds at most (p - s - 1) + 1 + s = p
    micro-batches (1F1B's first stage), and the late W's of the later stages fill the cool-down bubble."""
    _check(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    schedule = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        actions = []
        for mb in range(warmup):
            actions += _forward(s, p, mb)
        done_b = done_w = 0
        for mb in range(warmup, m + warmup):
            if mb < m:
                actions += _forward(s, p, mb)
            actions += _backward(s, p, done_b)
            done_b += 1
            if done_b - done_w > s:
                actions.append(Action("W", done_w))
                done_w += 1
        actions += [Action("W", mb) for mb in range(done_w, m)]
        schedule.append(actions)
    return schedule


SCHEDULES: dict[str, Callable[..., list[list[Action]]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_one_f_one_b, "zb-h1": zero_bubble_h1}
CHUNKED = ("interleaved-1f1b",)  # the schedules that run several model chunks per stage


def make_schedule(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> list[list[Action]]:
    """The schedule `name` (one of SCHEDULES) for `num_stages`, `num_microbatches` and, for the interleaved
    schedule, `num_chunks` model chunks per stage (the others run one)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    if name in CHUNKED:
        return SCHEDULES[name](num_stages, num_microbatches, num_chunks)
    if num_chunks != 1:
        raise ValueError(f"num_chunks: schedule {name!r} runs one model chunk per stage, got {num_chunks}")
    return SCHEDULES[name](num_stages, num_microbatches)
