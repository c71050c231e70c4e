"""Pipeline schedules as data: completeness, ordering, deadlock freedom, memory, bubble, Megatron's tables.

No processes, no torch: each schedule is checked by `simulate`, which runs all stages' action lists
together under rendezvous point-to-point semantics (NCCL's: a transfer happens once both ends are
posted), and by independent checks on the trace it returns.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megapmp.parallel.schedules import (B, COMMUNICATION, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, ScheduleError,
                                        all_forward_all_backward, build_schedule, interleaved_one_f_one_b,
                                        one_f_one_b, peak_activations, simulate, virtual_stage, with_communication)


@st.composite
def layouts(draw):
    """(schedule name, stages, micro-batches, chunks) valid for that schedule."""
    name = draw(st.sampled_from(["afab", "1f1b", "interleaved"]))
    stages = draw(st.integers(1 if name != "interleaved" else 2, 6))
    chunks = 1 if name == "1f1b" or stages == 1 else draw(st.integers(1 if name == "afab" else 2, 3))
    if name == "interleaved":
        microbatches = stages * draw(st.integers(1, 3))
    else:
        microbatches = draw(st.integers(1, 12))
    return name, stages, microbatches, chunks


def compute_order(actions):
    return [a for a in actions if a.kind in (F, B)]


def render(actions) -> str:
    """Compute actions as Megatron-table text: F3 B0 ...; chunk c > 0 as F3.1."""
    return " ".join(repr(a) for a in compute_order(actions))


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_every_forward_and_backward_exactly_once_and_backward_after_forward(layout):
    name, P, M, C = layout
    for s, actions in enumerate(build_schedule(name, P, M, C)):
        order = compute_order(actions)
        expected = {(k, m, c) for k in (F, B) for m in range(M) for c in range(C)}
        assert sorted((a.kind, a.microbatch, a.chunk) for a in order) == sorted(expected)
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(order)}
        assert all(position[(B, m, c)] > position[(F, m, c)] for m in range(M) for c in range(C))


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_communication_surrounds_compute_on_each_stage(layout):
    """Inputs are received before the compute that needs them, outputs sent after the one that made
    them, and only where a neighbouring virtual stage exists."""
    name, P, M, C = layout
    V = P * C
    for s, actions in enumerate(build_schedule(name, P, M, C)):
        at = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(actions)}
        assert len(at) == len(actions)  # no action twice
        for m in range(M):
            for c in range(C):
                v = virtual_stage(s, c, P)
                assert ((RECV_F, m, c) in at) == (v > 0) == ((SEND_B, m, c) in at)
                assert ((SEND_F, m, c) in at) == (v < V - 1) == ((RECV_B, m, c) in at)
                if v > 0:
                    assert at[(RECV_F, m, c)] < at[(F, m, c)] and at[(B, m, c)] < at[(SEND_B, m, c)]
                if v < V - 1:
                    assert at[(F, m, c)] < at[(SEND_F, m, c)] and at[(RECV_B, m, c)] < at[(B, m, c)]


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_global_simulation_is_deadlock_free_and_respects_dependencies(layout):
    """simulate raises on a deadlock or a message matched out of order; on the trace it returns,
    F(m) on virtual stage v starts after F(m) on v-1 ended and B(m) on v after B(m) on v+1."""
    name, P, M, C = layout
    trace = simulate(build_schedule(name, P, M, C))
    V = P * C
    when = {(a.kind, a.microbatch, virtual_stage(s, a.chunk, P)): (start, end) for start, end, s, a in trace.events}
    assert len(when) == 2 * M * V
    for m in range(M):
        for v in range(V):
            assert when[(B, m, v)][0] >= when[(F, m, v)][1]
            if v > 0:
                assert when[(F, m, v)][0] >= when[(F, m, v - 1)][1]
            if v < V - 1:
                assert when[(B, m, v)][0] >= when[(B, m, v + 1)][1]
    # A stage runs one compute at a time.
    for s in range(P):
        spans = sorted((start, end) for start, end, stage, _ in trace.events if stage == s)
        assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:]))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 16))
def test_memory_1f1b_holds_at_most_stages_minus_stage_activations_afab_holds_all(P, M):
    for s, actions in enumerate(one_f_one_b(P, M)):
        assert peak_activations(actions) == min(P - s, M)
    for s, actions in enumerate(all_forward_all_backward(P, M)):
        assert peak_activations(actions) == M


@pytest.mark.parametrize("P,M,C", [(2, 2, 2), (2, 8, 2), (4, 8, 2), (4, 16, 3), (3, 6, 4)])
def test_memory_interleaved_holds_warmup_plus_one(P, M, C):
    for s, actions in enumerate(interleaved_one_f_one_b(P, M, C)):
        assert peak_activations(actions) == min((P - s - 1) * 2 + (C - 1) * P + 1, M * C)


@pytest.mark.parametrize("P,M", [(2, 1), (2, 4), (4, 8), (4, 3), (5, 12)])
def test_bubble_1f1b_equals_afab_and_interleaving_shrinks_it(P, M):
    """With forward 1 and backward 2 time units per stage and free communication, AFAB and 1F1B both
    take (M + P - 1) * 3; C chunks of 1/C the work take (M + (P - 1) / C) * 3."""
    assert simulate(one_f_one_b(P, M)).makespan == simulate(all_forward_all_backward(P, M)).makespan == (M + P - 1) * 3
    if M % P == 0:
        for C in (2, 4):
            trace = simulate(interleaved_one_f_one_b(P, M, C), forward_cost=1 / C, backward_cost=2 / C)
            assert trace.makespan == pytest.approx((M + (P - 1) / C) * 3)


def test_1f1b_matches_megatron_table_4_stages_8_microbatches():
    """Megatron forward_backward_pipelining_without_interleaving: P - s - 1 warmup forwards."""
    expected = [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
    ]
    assert [render(a) for a in one_f_one_b(4, 8)] == expected


def test_1f1b_communication_matches_megatron_steady_state():
    """Stage 1 of 4: recv_forward / send_forward in warmup, then send_forward_recv_backward and
    send_backward_recv_forward as single batches (adjacent communications)."""
    actions = one_f_one_b(4, 8)[1]
    text = " ".join(repr(a) for a in actions)
    assert text.startswith("RECV_F0 F0 SEND_F0 RECV_F1 F1 SEND_F1 RECV_F2 F2 SEND_F2 RECV_B0 B0 SEND_B0 RECV_F3 F3")
    assert text.endswith("SEND_F7 RECV_B5 B5 SEND_B5 RECV_B6 B6 SEND_B6 RECV_B7 B7 SEND_B7")


def test_interleaved_matches_megatron_table_4_stages_8_microbatches_2_chunks():
    """Megatron forward_backward_pipelining_with_interleaving (microbatch group size = P): warmup
    (P - s - 1) * 2 + (C - 1) * P forwards; chunk ids reversed for backward."""
    schedule = interleaved_one_f_one_b(4, 8, 2)
    assert render(schedule[0]) == (
        "F0 F1 F2 F3 F0.1 F1.1 F2.1 F3.1 F4 F5 "  # 10 warmup forwards
        "F6 B0.1 F7 B1.1 F4.1 B2.1 F5.1 B3.1 F6.1 B0 F7.1 B1 "  # 6 steady 1F1B pairs
        "B2 B3 B4.1 B5.1 B6.1 B7.1 B4 B5 B6 B7")
    assert render(schedule[3]) == (
        "F0 F1 F2 F3 "
        "F0.1 B0.1 F1.1 B1.1 F2.1 B2.1 F3.1 B3.1 F4 B0 F5 B1 F6 B2 F7 B3 F4.1 B4.1 F5.1 B5.1 F6.1 B6.1 F7.1 B7.1 "
        "B4 B5 B6 B7")
    assert [len(compute_order(a)) for a in schedule] == [32] * 4


def test_interleaved_requires_microbatches_divisible_by_stages():
    with pytest.raises(ValueError, match="divisible"):
        interleaved_one_f_one_b(4, 6, 2)


@pytest.mark.parametrize("args", [(0, 4), (2, 0), (2, 4, 0), (True, 4), (1, 4, 2)])
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        all_forward_all_backward(*args)


def test_build_schedule_rejects_unknown_names_and_chunked_1f1b():
    with pytest.raises(ValueError, match="unknown"):
        build_schedule("zero-bubble", 2, 4)
    with pytest.raises(ValueError, match="interleaved"):
        build_schedule("1f1b", 2, 4, 2)


def test_simulate_catches_a_deadlock():
    """Receiving right before each compute (fine for 1F1B) deadlocks the interleaved order under
    rendezvous p2p: each stage blocks in a send whose receive the other posts only later."""
    P, M, C = 2, 4, 2
    rounds = interleaved_one_f_one_b(P, M, C)
    naive = [with_communication(compute_order(actions), s, P, C) for s, actions in enumerate(rounds)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(naive)


def test_simulate_catches_messages_matched_out_of_order():
    schedule = one_f_one_b(2, 2)
    stage1 = list(schedule[1])
    i, j = stage1.index(Action(RECV_F, 0)), stage1.index(Action(RECV_F, 1))
    stage1[i], stage1[j] = stage1[j], stage1[i]
    with pytest.raises(ScheduleError, match="sent as"):
        simulate([schedule[0], stage1])


def test_simulate_catches_compute_before_its_data():
    schedule = one_f_one_b(2, 1)
    stage1 = [a for a in schedule[1] if a.kind != RECV_F]
    stage0 = [a for a in schedule[0] if a.kind != SEND_F]
    with pytest.raises(ScheduleError, match="before its data"):
        simulate([stage0, stage1])


def test_single_stage_has_no_communication():
    for name in ("afab", "1f1b"):
        (actions,) = build_schedule(name, 1, 3)
        assert not [a for a in actions if a.kind in COMMUNICATION]
        assert render(actions) == ("F0 F1 F2 B0 B1 B2" if name == "afab" else "F0 B0 F1 B1 F2 B2")
