"""Run a pipeline schedule on a model of the machine: per-action costs, non-blocking sends, blocking recvs.

`simulate(schedule, cost)` runs every stage's action list in order. A compute action (F, B) takes
`cost(stage, action)` time; a send posts a message that arrives `cost(stage, send)` later and lets the sender
go on; a receive waits for its message. If at some point no stage can make progress while actions remain, the
schedule deadlocks and `DeadlockError` names each stage's blocked action. The result carries the timeline, the
bubble (the fraction of stage-time spent idle between the step's start and its end) and the peak number of
micro-batches whose forward has run but whose backward has not, per stage (the activations a stage keeps).
`plot_timeline` draws the timeline as a PNG: one row per stage, forwards and backwards as coloured boxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpuforge.parallel.model_parallel.pipeline_schedule import Action

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
    """Forward and backward 1, communication free."""
    return 1.0 if action.op in ("F", "B") else 0.0


def _validate(schedule: list[list[Action]]) -> None:
    """Each stage runs F then B of every micro-batch exactly once; peers are real neighbouring stages."""
    p = len(schedule)
    for s, actions in enumerate(schedule):
        forwards = [(a.microbatch, a.chunk) for a in actions if a.op == "F"]
        backwards = [(a.microbatch, a.chunk) for a in actions if a.op == "B"]
        if sorted(forwards) != sorted(set(forwards)) or sorted(forwards) != sorted(backwards):
            raise ValueError(
                f"stage {s}: every micro-batch needs exactly one F and one B, got F {forwards}, B {backwards}"
            )
        seen_f = set()
        for a in actions:
            if a.op == "F":
                seen_f.add((a.microbatch, a.chunk))
            elif a.op == "B" and (a.microbatch, a.chunk) not in seen_f:
                raise ValueError(f"stage {s}: {a} comes before its forward")
            elif a.op not in ("F", "B") and (a.peer is None or a.peer not in ((s - 1) % p, (s + 1) % p)):
                raise ValueError(f"stage {s}: {a} needs a neighbouring peer stage")


def simulate(schedule: list[list[Action]], cost: Callable[[int, Action], float] = unit_cost) -> SimResult:
    """Run `schedule` (one action list per stage) and return its timeline; raise DeadlockError if it hangs."""
    _validate(schedule)
    p = len(schedule)
    clock = [0.0] * p
    head = [0] * p
    busy = [0.0] * p
    in_flight = [0] * p
    peak = [0] * p
    # (recv op, microbatch, receiving virtual stage) -> arrival time; virtual stage = chunk · p + stage
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
                    to = a.chunk * p + s + (1 if a.op == "SEND_F" else -1)
                    arrivals[(_MESSAGE_OF[a.op], a.microbatch, to)] = start + cost(s, a)
                    end = start
                elif a.op in ("RECV_F", "RECV_B"):
                    key = (a.op, a.microbatch, a.chunk * p + s)
                    if key not in arrivals:
                        break
                    end = max(start, arrivals.pop(key))
                else:
                    end = start + cost(s, a)
                    busy[s] += end - start
                    in_flight[s] += 1 if a.op == "F" else -1
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
    shifted = []
    for e in sorted(events, key=lambda e: (e.stage, e.start)):
        shifted.append(Event(e.stage, e.action, e.start - t0, e.end - t0))
        if e.action.op in ("F", "B"):
            busy[e.stage] += e.end - e.start
            in_flight[e.stage] += 1 if e.action.op == "F" else -1
            peak[e.stage] = max(peak[e.stage], in_flight[e.stage])
    return SimResult(shifted, max(e.end for e in shifted), busy, peak)


def plot_timeline(result: SimResult, path: str, title: str = "pipeline schedule") -> None:
    """Save the timeline as a PNG: stages top to bottom, forwards blue, backwards orange, idle time blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = len(result.busy)
    fig, ax = plt.subplots(figsize=(max(6.0, result.makespan * 0.35), 0.6 * p + 1.2))
    colours = {"F": "tab:blue", "B": "tab:orange"}
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
    ax.set_title(f"{title} (bubble {result.bubble_fraction:.1%}; blue F, orange B)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
