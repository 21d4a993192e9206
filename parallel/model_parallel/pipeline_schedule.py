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
- DualPipeV (DeepSeek's DualPipe folded into a V, as in torch's ScheduleDualPipeV): 2 model chunks per stage
  placed in a V, stage s holding virtual stages s and 2p − 1 − s, so the first stage computes the embedding and
  the loss and the last stage hands chunk 0's output to its chunk 1 without a message; eight phases of
  forwards, full and split backwards per stage (`dualpipe_v`). Here a stage runs one action at a time, so the
  forward-backward pairs DualPipe overlaps run one after the other.

A schedule's placement says where virtual stage k lives: "loop" (interleaved and the one-chunk schedules: chunk
c of stage s is virtual stage c·p + s) or "v" (DualPipeV). `virtual_stage` maps (stage, chunk) to it.
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


def virtual_stage(stage: int, chunk: int, num_stages: int, placement: str = "loop") -> int:
    """The virtual stage (position in the model's chain of chunks) of `chunk` on `stage`."""
    if placement == "v":
        return stage if chunk == 0 else 2 * num_stages - 1 - stage
    return chunk * num_stages + stage


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


def dualpipe_v(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """DualPipeV on p stages, m >= 2p micro-batches, chunk 0 of stage s = virtual stage s, chunk 1 = 2p − 1 − s.

    Stage s computes, in order (DeepSeek's DualPipeV phases; a "zb" backward is B alone, its W queued and run
    later in queue order, any other backward is B then W at once):
      1. 2(p − s − 1) forwards of chunk 0;            2. s + 1 times: forward chunk 0, forward chunk 1;
      3. p − s − 1 times: zb backward chunk 1, one queued W, forward chunk 1;
      4. m − 2p + s + 1 times: forward chunk 0, backward chunk 1, forward chunk 1, backward chunk 0;
      5. p − s − 1 times: backward chunk 1, forward chunk 1, backward chunk 0;
      6. s + 1 times: backward chunk 1, backward chunk 0, zb from the middle of the phase on;
      7. p − s − 1 times: one queued W, zb backward chunk 0;   8. the s + 1 queued W's.
    Each forward or backward sends its boundary tensor to the stage of the next virtual stage at once (none at
    the V's turn, the last stage); each receive is posted just before the compute that needs it, or earlier
    where the peer sent other messages before it (messages between two stages are matched in order)."""
    _check(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    if m < 2 * p:
        raise ValueError(f"DualPipeV needs num_microbatches ({m}) >= 2 · num_stages ({2 * p})")
    computes = [_dualpipe_v_computes(s, p, m) for s in range(p)]

    def message(s: int, a: Action) -> tuple[str, int, int] | None:
        """(kind, receiving stage, receiving chunk) of the tensor compute `a` of stage s sends; None: local/last."""
        v = virtual_stage(s, a.chunk, p, "v")
        to = v + (1 if a.op == "F" else -1)
        if a.op == "W" or not 0 <= to < 2 * p:
            return None
        dst, chunk = (to, 0) if to < p else (2 * p - 1 - to, 1)
        return None if dst == s else (a.op, dst, chunk)

    sent = {(src, dst): [] for src in range(p) for dst in (src - 1, src + 1) if 0 <= dst < p}
    with_sends = []
    for s, acts in enumerate(computes):
        out = []
        for a in acts:
            out.append(a)
            msg = message(s, a)
            if msg is not None:
                kind, dst, chunk = msg
                out.append(Action("SEND_" + kind, a.microbatch, dst, a.chunk))
                sent[(s, dst)].append((kind, a.microbatch, chunk))
        with_sends.append(out)
    schedule = []
    for s, acts in enumerate(with_sends):
        received = {src: 0 for (src, dst) in sent if dst == s}
        out = []
        for a in acts:
            need = _dualpipe_v_input(s, a, p)
            if need is not None:
                src, kind = need
                queue = sent[(src, s)]
                target = queue.index((kind, a.microbatch, a.chunk))
                for k, c_mb, chunk in queue[received[src]:target + 1]:
                    out.append(Action("RECV_" + k, c_mb, src, chunk))
                received[src] = max(received[src], target + 1)
            out.append(a)
        schedule.append(out)
    return schedule


def _dualpipe_v_input(s: int, a: Action, p: int) -> tuple[int, str] | None:
    """(stage, kind) whose message compute `a` of stage s needs first; None: its input is on the stage."""
    if a.op not in ("F", "B"):
        return None
    v = virtual_stage(s, a.chunk, p, "v")
    frm = v - 1 if a.op == "F" else v + 1
    if not 0 <= frm < 2 * p:
        return None
    src = frm if frm < p else 2 * p - 1 - frm
    return None if src == s else (src, a.op)


def _dualpipe_v_computes(s: int, p: int, m: int) -> list[Action]:
    """The compute actions (F, B, W) of stage s under DualPipeV, in order (see `dualpipe_v`)."""
    acts, nxt, done, queued = [], {"F": [0, 0], "B": [0, 0]}, [], []

    def run(op: str, chunk: int, zb: bool = False) -> None:
        mb = nxt[op][chunk]
        nxt[op][chunk] += 1
        acts.append(Action(op, mb, None, chunk))
        if op == "B":
            (queued if zb else done).append(Action("W", mb, None, chunk))
            if not zb:
                acts.append(done.pop())

    def weight() -> None:
        acts.append(queued.pop(0))

    for _ in range(2 * (p - s - 1)):
        run("F", 0)
    for _ in range(s + 1):
        run("F", 0), run("F", 1)
    for _ in range(p - s - 1):
        run("B", 1, zb=True), weight(), run("F", 1)
    for _ in range(m - 2 * p + s + 1):
        run("F", 0), run("B", 1), run("F", 1), run("B", 0)
    for _ in range(p - s - 1):
        run("B", 1), run("F", 1), run("B", 0)
    zb = False
    for i in range(s + 1):
        zb = zb or (i == (s + 1) // 2 and s % 2 == 1)
        run("B", 1, zb)
        zb = zb or (i == (s + 1) // 2 and s % 2 == 0)
        run("B", 0, zb)
    for _ in range(p - s - 1):
        weight(), run("B", 0, zb=True)
    for _ in range(s + 1):
        weight()
    return acts


SCHEDULES: dict[str, Callable[..., list[list[Action]]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_one_f_one_b, "zb-h1": zero_bubble_h1,
    "dualpipev": dualpipe_v}
CHUNKED = ("interleaved-1f1b", "dualpipev")  # the schedules that run several model chunks per stage


def placement_of(name: str) -> str:
    """Where the schedule puts its virtual stages: "v" for DualPipeV, "loop" otherwise."""
    return "v" if name == "dualpipev" else "loop"


def make_schedule(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> list[list[Action]]:
    """The schedule `name` (one of SCHEDULES) for `num_stages`, `num_microbatches` and, for the interleaved
    schedule, `num_chunks` model chunks per stage (the others run one)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    if name == "dualpipev":
        if num_chunks != 2:
            raise ValueError(f"num_chunks: DualPipeV runs 2 model chunks per stage (a V), got {num_chunks}")
        return dualpipe_v(num_stages, num_microbatches)
    if name in CHUNKED:
        return SCHEDULES[name](num_stages, num_microbatches, num_chunks)
    if num_chunks != 1:
        raise ValueError(f"num_chunks: schedule {name!r} runs one model chunk per stage, got {num_chunks}")
    return SCHEDULES[name](num_stages, num_microbatches)
