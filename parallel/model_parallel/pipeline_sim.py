"""Run a pipeline schedule on a model of the machine: per-action costs, non-blocking sends, blocking recvs.

`simulate(schedule, cost, stage_time)` runs every stage's action list in order. A compute action (F, B, W)
takes `cost(stage, action)` time; a send posts a message that arrives `cost(stage, send)` after the send starts
and lets the sender go on; a receive waits for its message. `stage_time(stage, action)` (default 0) is the time
a send or receive keeps its own stage occupied besides waiting: the call itself, the copy out of the message
(on real processes ~0.1-0.3 ms each, which a schedule with many messages per step feels).
If at some point no stage can make progress while actions remain, the schedule deadlocks and `DeadlockError` names
each stage's blocked action. The result carries the timeline, the bubble (the fraction of stage-time spent idle
between the step's start and its end) and the peak number of micro-batches whose forward has run but whose backward
has not (under a zero-bubble schedule: whose W has not), per stage (the activations a stage keeps). Messages
between two stages are matched in order, as on the real communicators (no tags): a schedule whose receives come in
another order than the sends is rejected.
`plot_timeline` draws the timeline as a PNG: one row per stage, forwards, backwards and W as coloured boxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpuforge.parallel.model_parallel.pipeline_schedule import COMPUTE_OPS, Action, virtual_stage

_MESSAGE_OF = {"SEND_F": "RECV_F", "SEND_B": "RECV_B"}


class DeadlockError(RuntimeError):
    """No stage can run its next action, and some stages have actions left."""


@dataclass(frozen=True)
class Event:
    stage: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    timeline: list[Event]
    makespan: float
    busy: list[float]  # compute time per stage
    peak_in_flight: list[int]  # per stage

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-time over total stage-time, between time 0 and the last action's end."""
        total = self.makespan * len(self.busy)
        return 0.0 if total == 0 else 1.0 - sum(self.busy) / total


def unit_cost(stage: int, action: Action) -> float:
    """Forward, backward and weight-gradient 1, communication free."""
    return 1.0 if action.op in COMPUTE_OPS else 0.0


def releases(actions: list[Action]) -> str:
    """The op after which a stage frees a micro-batch's activations: W under a zero-bubble schedule, else B."""
    return "W" if any(a.op == "W" for a in actions) else "B"


def _validate(schedule: list[list[Action]], placement: str = "loop") -> None:
    """Each stage runs F then B (then W, if it runs any) of every micro-batch exactly once; peers are real
    neighbouring stages; between two stages the receives come in the order of the sends; a chunk fed by
    another chunk of its own stage (the V's turn) runs its forward after that chunk's, its backward before."""
    p = len(schedule)
    vs = lambda s, chunk: virtual_stage(s, chunk, p, placement)  # noqa: E731
    for s, actions in enumerate(schedule):
        units = {op: [(a.microbatch, a.chunk) for a in actions if a.op == op] for op in COMPUTE_OPS}
        ops = ("F", "B", "W") if units["W"] else ("F", "B")
        if len(set(units["F"])) != len(units["F"]) or any(sorted(units[op]) != sorted(units["F"]) for op in ops):
            raise ValueError(f"stage {s}: every micro-batch needs exactly one of each of {ops}, got "
                             + ", ".join(f"{op} {units[op]}" for op in ops))
        seen = {op: set() for op in COMPUTE_OPS}
        for a in actions:
            key = (a.microbatch, a.chunk)
            if a.op in COMPUTE_OPS:
                before = {"B": "F", "W": "B"}.get(a.op)
                if before and key not in seen[before]:
                    raise ValueError(f"stage {s}: {a} comes before its {'forward' if before == 'F' else 'B'}")
                seen[a.op].add(key)
            elif a.peer is None or a.peer not in ((s - 1) % p, (s + 1) % p):
                raise ValueError(f"stage {s}: {a} needs a neighbouring peer stage")
        chunk_at = {vs(s, c): c for c in {a.chunk for a in actions}}
        order = {(a.op, a.microbatch, a.chunk): i for i, a in enumerate(actions) if a.op in ("F", "B")}
        for (op, mb, c), i in order.items():
            before = chunk_at.get(vs(s, c) + (-1 if op == "F" else 1))
            if before is not None and order.get((op, mb, before), i + 1) > i:
                raise ValueError(f"stage {s}: {Action(op, mb, None, c)} needs {Action(op, mb, None, before)} "
                                 "of its own stage first")
    for src in range(p):
        for dst in {(src - 1) % p, (src + 1) % p} - {src}:
            sent = [(a.op[-1], a.microbatch, vs(src, a.chunk) + (1 if a.op == "SEND_F" else -1))
                    for a in schedule[src] if a.op in _MESSAGE_OF and a.peer == dst]
            received = [(a.op[-1], a.microbatch, vs(dst, a.chunk)) for a in schedule[dst]
                        if a.op in ("RECV_F", "RECV_B") and a.peer == src]
            if sent != received:
                raise ValueError(f"stages {src} -> {dst}: messages are matched in order, but the sends "
                                 f"{sent[:8]} and the receives {received[:8]} differ")


def no_stage_time(stage: int, action: Action) -> float:
    return 0.0


def simulate(schedule: list[list[Action]], cost: Callable[[int, Action], float] = unit_cost,
             stage_time: Callable[[int, Action], float] = no_stage_time, placement: str = "loop") -> SimResult:
    """Run `schedule` (one action list per stage, virtual stages placed by `placement`, pipeline_schedule.py)
    and return its timeline; raise DeadlockError if it hangs."""
    _validate(schedule, placement)
    p = len(schedule)
    clock = [0.0] * p
    head = [0] * p
    busy = [0.0] * p
    in_flight = [0] * p
    peak = [0] * p
    release = [releases(actions) for actions in schedule]
    # (recv op, microbatch, receiving virtual stage) -> arrival time
    arrivals: dict[tuple[str, int, int], float] = {}
    timeline: list[Event] = []
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for s in range(p):
            while head[s] < len(schedule[s]):
                a = schedule[s][head[s]]
                start = clock[s]
                if a.op in _MESSAGE_OF:
                    to = virtual_stage(s, a.chunk, p, placement) + (1 if a.op == "SEND_F" else -1)
                    arrivals[(_MESSAGE_OF[a.op], a.microbatch, to)] = start + cost(s, a)
                    end = start + stage_time(s, a)
                elif a.op in ("RECV_F", "RECV_B"):
                    key = (a.op, a.microbatch, virtual_stage(s, a.chunk, p, placement))
                    if key not in arrivals:
                        break
                    end = max(start, arrivals.pop(key)) + stage_time(s, a)
                else:
                    end = start + cost(s, a)
                    busy[s] += end - start
                    in_flight[s] += 1 if a.op == "F" else -(a.op == release[s])
                    peak[s] = max(peak[s], in_flight[s])
                timeline.append(Event(s, a, start, end))
                clock[s] = end
                head[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = {s: str(schedule[s][head[s]]) for s in range(p) if head[s] < len(schedule[s])}
            raise DeadlockError(f"pipeline schedule deadlocks; each stage's blocked action: {blocked}")
    if arrivals:
        raise ValueError(f"messages sent but never received: {sorted(arrivals)}")
    return SimResult(timeline, max(clock, default=0.0), busy, peak)


def measured_result(events: list[Event]) -> SimResult:
    """A SimResult from events measured on real processes (wall-clock times of every stage, one machine):
    times shifted to start at 0, busy = forward and backward time, in-flight counted as in `simulate`."""
    t0 = min(e.start for e in events)
    p = 1 + max(e.stage for e in events)
    busy, in_flight, peak = [0.0] * p, [0] * p, [0] * p
    release = [releases([e.action for e in events if e.stage == s]) for s in range(p)]
    shifted = []
    for e in sorted(events, key=lambda e: (e.stage, e.start)):
        shifted.append(Event(e.stage, e.action, e.start - t0, e.end - t0))
        if e.action.op in COMPUTE_OPS:
            busy[e.stage] += e.end - e.start
            in_flight[e.stage] += 1 if e.action.op == "F" else -(e.action.op == release[e.stage])
            peak[e.stage] = max(peak[e.stage], in_flight[e.stage])
    return SimResult(shifted, max(e.end for e in shifted), busy, peak)


def plot_timeline(result: SimResult, path: str, title: str = "pipeline schedule") -> None:
    """Save the timeline as a PNG: stages top to bottom, forwards blue, backwards orange, W green, idle blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = len(result.busy)
    fig, ax = plt.subplots(figsize=(max(6.0, result.makespan * 0.35), 0.6 * p + 1.2))
    colours = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    for e in result.timeline:
        if e.action.op not in colours or e.end <= e.start:
            continue
        ax.broken_barh([(e.start, e.end - e.start)], (e.stage - 0.4, 0.8), facecolors=colours[e.action.op],
                       edgecolor="black", linewidth=0.5)
        mid = (e.start + e.end) / 2
        ax.text(mid, e.stage, str(e.action.microbatch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{title} (bubble {result.bubble_fraction:.1%}; blue F, orange B, green W)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
