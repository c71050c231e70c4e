"""Pipeline schedules as data: for each stage, the list of actions it runs in one optimizer step.

No torch here. ``megapmp.parallel.pipeline.run_schedule`` executes one stage's list; ``simulate``
runs all stages' lists together under blocking point-to-point semantics and so proves a schedule
deadlock-free before any process runs it.

Model chunks and virtual stages. Stage s of P holds C model chunks; chunk c of stage s is virtual
stage ``v = c * P + s`` (Megatron's interleaved layout), so a micro-batch visits stage 0, 1, ..., P-1,
then stage 0 again with chunk 1, and so on. Without interleaving C = 1 and v = s. Virtual stage 0
holds the embedding, virtual stage V-1 = P*C - 1 the final norm, the heads and the loss.

Actions, executed in list order (m = micro-batch, c = chunk, v = this chunk's virtual stage):

    F(m, c)       forward of chunk c on micro-batch m; on virtual stage V-1 it also computes the loss
    B(m, c)       backward of F(m, c): from the loss on V-1, else with the gradient got by RECV_B
    RECV_F(m, c)  receive F(m, c)'s input activations from virtual stage v-1
    SEND_F(m, c)  send F(m, c)'s output activations to virtual stage v+1
    RECV_B(m, c)  receive the gradient of the loss w.r.t. F(m, c)'s output from virtual stage v+1
    SEND_B(m, c)  send the gradient w.r.t. F(m, c)'s input to virtual stage v-1

Communication is explicit so that the list says exactly where a stage blocks. A maximal run of
consecutive communication actions is one *batch*: posted together (``batch_isend_irecv``) and
waited for together. That is what lets stage s send F(m) forward and receive B(j) from the same
neighbour without a deadlock (Megatron's ``send_forward_recv_backward``).
AFAB and 1F1B place each RECV right before the compute that needs it and each SEND right after the
compute that produced it, so adjacent communications fuse into Megatron's combined batches. The
interleaved schedule uses Megatron's placement for it instead: one batch after each round of compute
sends that round's outputs and receives the next round's inputs (the simple placement deadlocks there).

Point-to-point messages carry no tags (NCCL ignores them), so between two stages the messages of one
direction are matched in posting order. ``simulate`` checks that every channel's sends and receives
list the same messages in the same order, and that no stage can block forever under the strictest
semantics (NCCL's rendezvous: a transfer happens once both ends are posted; a batch completes when all
of its transfers have happened). A schedule passing ``simulate`` also runs on gloo, whose sends are
buffered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

F, B = "F", "B"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B)
COMMUNICATION = (SEND_F, RECV_F, SEND_B, RECV_B)


class ScheduleError(ValueError):
    """A schedule that cannot run: bad arguments, a deadlock, or mismatched messages."""


@dataclass(frozen=True)
class Action:
    kind: str  # one of COMPUTE + COMMUNICATION
    microbatch: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


Schedule = list[list[Action]]  # one action list per stage


def virtual_stage(stage: int, chunk: int, num_stages: int) -> int:
    return chunk * num_stages + stage


def peer_stage(action: Action, stage: int, num_stages: int) -> int:
    """The stage a communication action of `stage` talks to."""
    step = 1 if action.kind in (SEND_F, RECV_B) else -1  # towards v+1, or v-1
    return (stage + step) % num_stages


def num_chunks_of(schedule: Schedule) -> int:
    return 1 + max((a.chunk for actions in schedule for a in actions), default=0)


# ----------------------------------------------------------------------------------- builders


def all_forward_all_backward(num_stages: int, num_microbatches: int, num_chunks: int = 1) -> Schedule:
    """GPipe: every forward, then every backward (with C > 1 chunks, in the interleaved schedule's
    order, see `interleaved_one_f_one_b`). Holds all M*C micro-batches' activations at once: the
    reference every other schedule must match, not the fast path."""
    _check(num_stages, num_microbatches, num_chunks)
    table = _chunk_table(num_stages, num_microbatches, num_chunks)
    order = [Action(F, m, c) for m, c in table] + [Action(B, m, num_chunks - 1 - c) for m, c in table]
    return [with_communication(order, s, num_stages, num_chunks) for s in range(num_stages)]


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """Megatron's non-interleaved 1F1B (PipeDream-Flush): stage s runs min(P - s - 1, M) warmup
    forwards, then alternates one forward and one backward, then drains the remaining backwards.
    At most P - s micro-batches' activations are alive on stage s at any time."""
    _check(num_stages, num_microbatches, 1)
    P, M = num_stages, num_microbatches
    schedule = []
    for s in range(P):
        warmup = min(P - s - 1, M)
        order = [Action(F, m) for m in range(warmup)]
        for i in range(M - warmup):
            order += [Action(F, warmup + i), Action(B, i)]
        order += [Action(B, m) for m in range(M - warmup, M)]
        schedule.append(with_communication(order, s, P, 1))
    return schedule


def interleaved_one_f_one_b(num_stages: int, num_microbatches: int, num_chunks: int) -> Schedule:
    """Megatron's interleaved 1F1B (virtual pipeline stages, arXiv 2104.04473 sec. 2.2).

    Micro-batches go through the chunks in groups of P: forwards run (m 0..P-1, chunk 0),
    (m 0..P-1, chunk 1), ..., then the next group of P micro-batches; backwards in the same order with
    the chunks reversed. Stage s runs (P - s - 1) * 2 + (C - 1) * P warmup forwards (all M*C if that
    is more), then 1F1B, then the remaining backwards. Like Megatron, requires M % P == 0.
    """
    _check(num_stages, num_microbatches, num_chunks)
    P, M, C = num_stages, num_microbatches, num_chunks
    if M % P:
        raise ScheduleError(f"the interleaved schedule needs num_microbatches ({M}) divisible by "
                            f"num_stages ({P})")
    table = _chunk_table(P, M, C)
    total = M * C
    forward = [Action(F, m, c) for m, c in table]
    backward = [Action(B, m, C - 1 - c) for m, c in table]
    schedule = []
    for s in range(P):
        warmup = min((P - s - 1) * 2 + (C - 1) * P, total)
        rounds = [[f] for f in forward[:warmup]]
        rounds += [[forward[warmup + i], backward[i]] for i in range(total - warmup)]
        rounds += [[b] for b in backward[total - warmup:]]
        schedule.append(_rounds_with_communication(rounds, s, P, C))
    return schedule


SCHEDULES = {"afab": all_forward_all_backward, "1f1b": one_f_one_b, "interleaved": interleaved_one_f_one_b}


def build_schedule(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> Schedule:
    """Config-facing entry point: name is one of SCHEDULES; 1f1b needs num_chunks == 1."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if name == "1f1b":
        if num_chunks != 1:
            raise ScheduleError(f"1f1b runs one model chunk per stage, got num_chunks={num_chunks}; "
                                "use 'interleaved'")
        return one_f_one_b(num_stages, num_microbatches)
    return SCHEDULES[name](num_stages, num_microbatches, num_chunks)


def _chunk_table(num_stages: int, num_microbatches: int, num_chunks: int) -> list[tuple[int, int]]:
    """(micro-batch, chunk) in forward order: groups of P micro-batches go through every chunk before
    the next group starts (Megatron's ``get_schedule_table``; the last group may be smaller).

    Taking chunk 0 of all M micro-batches first would deadlock for M > P under rendezvous p2p:
    stage P-1 would send chunk 0's output to stage 0, which receives it only after its last chunk-0
    forward, while the stages in between block on their own sends."""
    P, M, C = num_stages, num_microbatches, num_chunks
    return [(m, c) for start in range(0, M, P) for c in range(C) for m in range(start, min(start + P, M))]


def _check(num_stages: int, num_microbatches: int, num_chunks: int) -> None:
    problems = [f"{name}={value!r} must be a positive integer"
                for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                                    ("num_chunks", num_chunks))
                if isinstance(value, bool) or not isinstance(value, int) or value < 1]
    if not problems and num_stages == 1 and num_chunks > 1:
        problems.append(f"num_chunks={num_chunks} needs num_stages > 1 (one stage runs one chunk)")
    if problems:
        raise ScheduleError("; ".join(problems))


def with_communication(order: list[Action], stage: int, num_stages: int, num_chunks: int) -> list[Action]:
    """Insert the p2p actions around a compute order: receive right before, send right after."""
    last = num_stages * num_chunks - 1
    actions = []
    for a in order:
        v = virtual_stage(stage, a.chunk, num_stages)
        if a.kind == F:
            actions += ([Action(RECV_F, a.microbatch, a.chunk)] if v > 0 else []) + [a]
            actions += [Action(SEND_F, a.microbatch, a.chunk)] if v < last else []
        else:
            actions += ([Action(RECV_B, a.microbatch, a.chunk)] if v < last else []) + [a]
            actions += [Action(SEND_B, a.microbatch, a.chunk)] if v > 0 else []
    return actions


def _rounds_with_communication(rounds: list[list[Action]], stage: int, num_stages: int,
                               num_chunks: int) -> list[Action]:
    """Megatron's interleaved placement: after each round of compute, one batch sends that round's
    outputs and receives the next round's inputs (``send_forward_backward_recv_forward_backward``).
    Receiving right before each compute, as `with_communication` does, deadlocks here: the chunk
    that feeds a stage's next forward may be computed only after that stage's current backward."""
    last = num_stages * num_chunks - 1

    def sends(actions):
        return [Action(SEND_F if a.kind == F else SEND_B, a.microbatch, a.chunk) for a in actions
                if (a.kind == F and virtual_stage(stage, a.chunk, num_stages) < last)
                or (a.kind == B and virtual_stage(stage, a.chunk, num_stages) > 0)]

    def recvs(actions):
        return [Action(RECV_F if a.kind == F else RECV_B, a.microbatch, a.chunk) for a in actions
                if (a.kind == F and virtual_stage(stage, a.chunk, num_stages) > 0)
                or (a.kind == B and virtual_stage(stage, a.chunk, num_stages) < last)]

    out = recvs(rounds[0]) if rounds else []
    for i, compute in enumerate(rounds):
        out += compute + sends(compute) + (recvs(rounds[i + 1]) if i + 1 < len(rounds) else [])
    return out


# ------------------------------------------------------------------------------ analysis


def communication_batches(actions: list[Action]) -> list[Action | tuple[Action, ...]]:
    """A stage's list as the executor runs it: each compute action alone, each run of consecutive p2p
    actions as one batch (a tuple, posted together)."""
    out: list = []
    for a in actions:
        if a.kind in COMPUTE:
            out.append(a)
        elif out and isinstance(out[-1], tuple):
            out[-1] = out[-1] + (a,)
        else:
            out.append((a,))
    return out


def peak_activations(actions: list[Action]) -> int:
    """Most micro-batch forwards (over all chunks) whose backward has not run yet, i.e. how many
    micro-batches' activations a stage holds at its peak."""
    alive = peak = 0
    for a in actions:
        alive += (a.kind == F) - (a.kind == B)
        peak = max(peak, alive)
    return peak


@dataclass
class Trace:
    """The result of `simulate`: when each compute action ran (start, end, stage, action)."""

    events: list[tuple[float, float, int, Action]] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((end for _, end, _, _ in self.events), default=0.0)

    def time_of(self, stage: int, action: Action) -> tuple[float, float]:
        for start, end, s, a in self.events:
            if s == stage and a == action:
                return start, end
        raise KeyError((stage, action))


def _message(action: Action, stage: int, num_stages: int) -> tuple[str, int, int]:
    """What a communication action carries: (direction, micro-batch, receiving virtual stage)."""
    v = virtual_stage(stage, action.chunk, num_stages)
    if action.kind == SEND_F:
        return F, action.microbatch, v + 1
    if action.kind == RECV_F:
        return F, action.microbatch, v
    if action.kind == SEND_B:
        return B, action.microbatch, v - 1
    return B, action.microbatch, v  # RECV_B


def simulate(schedule: Schedule, *, forward_cost: float = 1.0, backward_cost: float = 2.0) -> Trace:
    """Run every stage's actions together; raise ScheduleError on a deadlock, on messages matched out
    of order, or on an action whose data is not there yet (e.g. F before its input arrived).

    Compute costs `forward_cost`/`backward_cost` per chunk, communication none, so the makespan
    compares schedules (bubble) as well.
    """
    P = len(schedule)
    V = P * num_chunks_of(schedule)
    stage_steps = [communication_batches(actions) for actions in schedule]

    # Match the k-th send on each channel (src -> dst) with the k-th receive there.
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    for s, stage_step_list in enumerate(stage_steps):
        for i, step in enumerate(stage_step_list):
            for a in step if isinstance(step, tuple) else ():
                peer = peer_stage(a, s, P)
                if peer == s and P > 1:
                    raise ScheduleError(f"stage {s}: {a} talks to itself")
                if a.kind in (SEND_F, SEND_B):
                    sends.setdefault((s, peer), []).append((_message(a, s, P), s, i))
                else:
                    recvs.setdefault((peer, s), []).append((_message(a, s, P), s, i))
    counterpart: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for channel in set(sends) | set(recvs):
        out, inc = sends.get(channel, []), recvs.get(channel, [])
        if len(out) != len(inc):
            raise ScheduleError(f"channel {channel[0]}->{channel[1]}: {len(out)} sends but {len(inc)} receives")
        for k, ((msg_out, s, i), (msg_in, t, j)) in enumerate(zip(out, inc)):
            if msg_out != msg_in:
                raise ScheduleError(f"channel {channel[0]}->{channel[1]}: message #{k} is sent as {msg_out} "
                                    f"but received as {msg_in}")
            counterpart.setdefault((s, i), []).append((t, j))
            counterpart.setdefault((t, j), []).append((s, i))

    pc = [0] * P
    clock = [0.0] * P
    posted: dict[tuple[int, int], float] = {}
    have: set[tuple] = set()  # data present on a stage: ("in"/"out"/"gin"/"gout", m, v)
    done: set[tuple] = set()  # (F|B, m, v) computed
    trace = Trace()

    def need(s, key, what):
        if key not in have:
            raise ScheduleError(f"stage {s}: {what} runs before its data is there")

    while True:
        for s in range(P):  # compute until every stage waits on a batch (or is finished)
            while pc[s] < len(stage_steps[s]) and not isinstance(stage_steps[s][pc[s]], tuple):
                a = stage_steps[s][pc[s]]
                v = virtual_stage(s, a.chunk, P)
                m = a.microbatch
                if a.kind == F:
                    if (F, m, v) in done:
                        raise ScheduleError(f"stage {s}: {a} runs twice")
                    if v > 0:
                        need(s, ("in", m, v), a)
                    have.add(("out", m, v))
                    cost = forward_cost
                else:
                    if (F, m, v) not in done or (B, m, v) in done:
                        raise ScheduleError(f"stage {s}: {a} without its forward, or twice")
                    if v < V - 1:
                        need(s, ("gout", m, v), a)
                    have.add(("gin", m, v))
                    cost = backward_cost
                done.add((a.kind, m, v))
                trace.events.append((clock[s], clock[s] + cost, s, a))
                clock[s] += cost
                pc[s] += 1
            if pc[s] < len(stage_steps[s]):
                posted.setdefault((s, pc[s]), clock[s])
        if all(pc[s] == len(stage_steps[s]) for s in range(P)):
            break
        ready = [s for s in range(P) if pc[s] < len(stage_steps[s])
                 and all(j <= pc[t] for t, j in counterpart.get((s, pc[s]), []))]
        if not ready:
            blocked = {s: stage_steps[s][pc[s]] for s in range(P) if pc[s] < len(stage_steps[s])}
            raise ScheduleError(f"deadlock: stages wait forever on {blocked}")
        finish = {s: max([posted[(s, pc[s])]] + [posted[key] for key in counterpart.get((s, pc[s]), [])])
                  for s in ready}
        for s in ready:
            for a in stage_steps[s][pc[s]]:
                v = virtual_stage(s, a.chunk, P)
                m = a.microbatch
                if a.kind == SEND_F:
                    need(s, ("out", m, v), a)
                elif a.kind == SEND_B:
                    need(s, ("gin", m, v), a)
                elif a.kind == RECV_F:  # its sender is posted, and the match above checked the message
                    have.add(("in", m, v))
                else:
                    have.add(("gout", m, v))
            clock[s] = finish[s]
            pc[s] += 1
    num_microbatches = 1 + max((a.microbatch for actions in schedule for a in actions), default=-1)
    missing = [(kind, m, v) for kind in COMPUTE for m in range(num_microbatches) for v in range(V)
               if (kind, m, v) not in done]
    if missing:
        raise ScheduleError(f"never computed: {missing}")
    return trace
