"""Attention backends against the dense-mask reference, the varlen call site, and optional accelerators.

Tolerance: fp32 on CPU, atol 1e-5 (as tests/test_model.py): every backend computes the same softmax
over the same keys; only the summation order differs (keys absent vs masked, other SDPA kernels),
~1e-6 on these O(1) inputs. The flash_attn / torch_varlen tests need CUDA and are skipped on CPU: their
index building is covered here through ``varlen_reference``, which the same call site drives.
"""
import importlib.util

import numpy as np
import pytest
import torch

from megapmp.accelerators import Probe, backend_report, detect_accelerators, format_report, select_attention_backend
from megapmp.config import model_preset
from megapmp.data.datasets import Pair
from megapmp.data.packing import pack_pairs
from megapmp.model import AttentionInputs, Qwen2RewardModel, attention
from megapmp.model.attention import (BucketPlan, _torch_varlen_kernel, backend_available, prepare_attention,
                                     resolve_attention_backend, segment_structure, torch_varlen_usable,
                                     varlen_attention, varlen_reference)
from tool_loader import load_tool

ATOL = 1e-5
CPU_BACKENDS = ["segmented", "varlen_reference", "auto"]


def packed_attn(layout, seed=0, n_pairs=7, seq_len=64, lengths=(1, 12)):
    rng = np.random.default_rng(seed)
    pairs = [Pair(*(np.arange(rng.integers(*lengths)) + 2 for _ in range(3))) for _ in range(n_pairs)]
    b = pack_pairs(pairs, seq_len, layout, pad_id=0)
    return AttentionInputs.from_segments(b.segment_ids, b.branch_ids)


def qkv(attn, heads, kv_heads, dim=8, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    rows, seq_len = attn.shape
    make = lambda h: torch.randn(rows, seq_len, h, dim, dtype=dtype, requires_grad=True)
    return make(heads), make(kv_heads), make(kv_heads)


def run(backend, q, k, v, attn, grad_out):
    out = attention(q, k, v, attn, backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


HAND_ROWS = {
    # [P C R] with p = 4, c = 3, r = 5; a plain segment; padding.
    "shared_prefix": ([[0] * 12 + [1] * 7 + [-1] * 2], [[0] * 4 + [1] * 3 + [2] * 5 + [0] * 9]),
    # p = 0 ([C R]: R sees only R), x-only ([P C]), a one-token segment, no padding.
    "edge_patterns": ([[0] * 5 + [1] * 4 + [2] + [3] * 3], [[1] * 2 + [2] * 3 + [0] * 2 + [1] * 2 + [0] + [0] * 3]),
    # rows entirely padding and rows without padding
    "padding_rows": ([[0] * 6, [-1] * 6, [0, 0, 1, 1, 1, -1]], [[0, 0, 1, 1, 2, 2], [0] * 6, [0] * 6]),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("case", ["duplicated", "shared-prefix", *HAND_ROWS])
def test_backend_matches_dense_reference_forward_and_grads(backend, heads, kv_heads, case):
    if case in HAND_ROWS:
        attn = AttentionInputs.from_segments(*HAND_ROWS[case])
    else:
        attn = packed_attn(case, seed=heads + kv_heads)
    q, k, v = qkv(attn, heads, kv_heads)
    grad_out = torch.randn_like(q)
    expected = run("sdpa", q, k, v, attn, grad_out)
    got = run(backend, q, k, v, attn, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=name)


def test_segmented_model_matches_sdpa_model_with_activation_checkpointing():
    attn = packed_attn("shared-prefix", seed=3, n_pairs=5, seq_len=48)
    positions = attn.default_position_ids()
    tokens = torch.randint(0, 384, attn.shape, generator=torch.Generator().manual_seed(0))
    grads, hiddens = [], []
    for backend, checkpointing in (("sdpa", False), ("segmented", True)):
        torch.manual_seed(0)
        model = Qwen2RewardModel(model_preset("tiny"), attention_backend=backend,
                                 activation_checkpointing=checkpointing)
        model.init_weights()
        hidden = model.train()(tokens, positions, attn)
        (model.rewards(hidden).sum() + model.lm_logits(hidden).logsumexp(-1).mean()).backward()
        hiddens.append(hidden.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(hiddens[1], hiddens[0], rtol=0, atol=ATOL)
    for name in grads[0]:
        # score.weight's gradient sums ~10 hidden states into entries of magnitude ~100, where one fp32
        # ulp is 7.6e-6: an absolute tolerance alone failed for some token draws, so fp32's rtol is added.
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1.3e-6, atol=ATOL, msg=name)


# ---------------------------------------------------------------- the varlen decomposition


def test_structure_and_varlen_plan_of_a_shared_prefix_row():
    attn = AttentionInputs.from_segments(*HAND_ROWS["shared_prefix"])
    assert segment_structure(attn.segment_ids, attn.branch_ids).tolist() == [[0, 4, 3, 5], [12, 7, 0, 0]]
    plan = attn.varlen_plan()
    # problems: [P C] (7 over 7), R over [P R] (5 over 9), the plain segment (7 over 7)
    assert plan.cu_q.tolist() == [0, 7, 12, 19] and plan.cu_k.tolist() == [0, 7, 16, 23]
    assert (plan.max_q, plan.max_k) == (7, 9)
    assert plan.q_index.tolist() == list(range(19))
    assert plan.k_index.tolist() == list(range(7)) + [0, 1, 2, 3, 7, 8, 9, 10, 11] + list(range(12, 19))
    assert plan.pad_index.tolist() == [19, 20] and not plan.identity
    assert sorted(plan.out_index.tolist()) == list(range(21))
    assert plan.cu_q.dtype == plan.cu_k.dtype == torch.int32  # what flash-attn demands


def test_plain_unpadded_rows_skip_the_gathers():
    plan = AttentionInputs.from_segment_lengths([[3, 5], [8]], 8).varlen_plan()
    assert plan.identity and plan.cu_q.tolist() == plan.cu_k.tolist() == [0, 3, 8, 16]


def test_plan_is_cached_per_device():
    attn = packed_attn("duplicated")
    assert attn.varlen_plan() is attn.varlen_plan("cpu") and attn.bucket_plan() is attn.bucket_plan()


def test_prepare_attention_builds_what_the_backend_reads_before_any_call():
    plain, odd = packed_attn("shared-prefix"), AttentionInputs.from_segments([[0, 0, 0, 0, -1]], [[0, 1, 0, 2, 0]])
    assert prepare_attention(plain, "auto", "cpu", torch.float32) == "segmented"
    assert ("buckets", "cpu") in plain._plan_cache and not plain._mask_cache
    assert prepare_attention(odd, "auto", "cpu", torch.float32) == "segmented"
    assert torch.device("cpu") in odd._mask_cache  # no buckets for that pattern: the dense mask
    assert prepare_attention(plain, "varlen_reference", "cpu") == "varlen_reference"
    assert ("varlen", "cpu") in plain._plan_cache


def test_buckets_stay_within_their_padding_slack():
    attn = packed_attn("shared-prefix", seed=5, n_pairs=40, seq_len=256, lengths=(1, 40))
    plan = attn.bucket_plan()
    padded = 0
    for bucket in plan.buckets:
        b, lq = bucket.q_index.shape
        padded += b * lq * bucket.k_index.shape[1]
    varlen = attn.varlen_plan()
    lq, lk = np.diff(varlen.cu_q.numpy()), np.diff(varlen.cu_k.numpy())
    real = int((lq * lk).sum())
    assert padded <= BucketPlan.SLACK * real
    assert len(plan.buckets) < len(lq)  # problems really are batched


def test_varlen_reference_follows_flash_attn_bottom_right_causal_doc():
    # flash_attn_varlen_func docstring: seqlen_q = 2, seqlen_k = 5 keeps [1 1 1 1 0; 1 1 1 1 1];
    # seqlen_q = 5, seqlen_k = 2 keeps [0 0; 0 0; 0 0; 1 0; 1 1], and an all-zero row outputs zero.
    torch.manual_seed(0)
    v = torch.randn(7, 1, 4)
    cu_q, cu_k = torch.tensor([0, 2, 7]), torch.tensor([0, 5, 7])
    q = torch.zeros(7, 1, 4)  # equal scores: the output is the mean of the visible values
    k = torch.zeros(7, 1, 4)
    out = varlen_reference(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(out[0], v[0:4].mean(0))
    torch.testing.assert_close(out[1], v[0:5].mean(0))
    assert out[2:5].abs().max() == 0
    torch.testing.assert_close(out[5], v[5])
    torch.testing.assert_close(out[6], v[5:7].mean(0))


def test_unsupported_branch_pattern():
    # shared tokens after a response: not a pattern the packers produce nor the varlen kernels express
    attn = AttentionInputs.from_segments([[0, 0, 0, 0, -1]], [[0, 1, 0, 2, 0]])
    assert segment_structure(attn.segment_ids, attn.branch_ids) is None
    q, k, v = qkv(attn, 2, 1)
    grad_out = torch.randn_like(q)
    for backend in ("segmented", "auto"):  # fall back to the dense reference
        for a, b in zip(run(backend, q, k, v, attn, grad_out), run("sdpa", q, k, v, attn, grad_out)):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="use attention backend 'sdpa'"):
        attention(q, k, v, attn, "varlen_reference")


def test_gpu_backends_refuse_cleanly_on_cpu():
    attn = packed_attn("duplicated")
    q, k, v = qkv(attn, 4, 2)
    for backend in ("flash_attn", "torch_varlen"):
        ok, reason = backend_available(backend, "cpu")
        assert not ok and "CUDA" in reason
        with pytest.raises(RuntimeError, match="not usable here"):
            attention(q, k, v, attn, backend)
    assert resolve_attention_backend("auto", "cpu", torch.float32) == "segmented"
    assert not backend_available("flash_attn", "cuda", torch.float32)[0]  # fp32: flash kernels are half-only


def fake_varlen_attn_without_gqa(calls):
    """torch 2.11's varlen_attn signature (no enable_gqa), computed by varlen_reference, which would
    broadcast fewer kv heads by itself: so it refuses them, as the real kernel does without enable_gqa."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        assert window_size == (-1, 0), "causal is spelled window_size=(-1, 0)"
        assert key.shape[1] == value.shape[1] == query.shape[1], "no GQA without enable_gqa"
        calls.append(key.shape[1])
        return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, causal_bottom_right=True)

    return varlen_attn


@pytest.fixture
def varlen_without_gqa(monkeypatch):
    import torch.nn.attention.varlen as varlen_module

    calls = []
    monkeypatch.setattr(varlen_module, "varlen_attn", fake_varlen_attn_without_gqa(calls))
    torch_varlen_usable.cache_clear()
    yield calls
    torch_varlen_usable.cache_clear()


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("layout", ["duplicated", "shared-prefix"])
def test_torch_varlen_repeats_kv_heads_where_varlen_attn_lacks_enable_gqa(varlen_without_gqa, layout, heads,
                                                                           kv_heads):
    attn = packed_attn(layout, seed=heads * kv_heads)
    q, k, v = qkv(attn, heads, kv_heads)
    grad_out = torch.randn_like(q)
    out = varlen_attention(q, k, v, attn, _torch_varlen_kernel)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    expected = run("varlen_reference", q, k, v, attn, grad_out)  # GQA inside the reference: head h -> h // groups
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=name)
    assert varlen_without_gqa and set(varlen_without_gqa) == {heads}  # the kernel saw repeated kv heads
    ok, reason = torch_varlen_usable()
    assert ok and "kv heads repeated" in reason


def test_torch_varlen_kv_repeat_order_is_gqa_order(varlen_without_gqa):
    # Query head h must read kv head h // groups: with kv heads of distinct constant values, query head h's
    # output is kv head (h // groups)'s value. A tiled repeat (h % n_kv) would give another order.
    attn = AttentionInputs.for_padded_causal([3], 3)
    q = torch.zeros(1, 3, 6, 4)
    k = torch.zeros(1, 3, 3, 4)
    v = torch.arange(3.0)[None, None, :, None].expand(1, 3, 3, 4).contiguous()
    out = varlen_attention(q, k, v, attn, _torch_varlen_kernel)
    torch.testing.assert_close(out[0, :, :, 0], torch.tensor([[0.0, 0, 1, 1, 2, 2]] * 3))


def test_torch_varlen_needs_window_size(monkeypatch):
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None)
    torch_varlen_usable.cache_clear()
    try:
        ok, reason = torch_varlen_usable()
    finally:
        torch_varlen_usable.cache_clear()
    assert not ok and "lacks window_size" in reason


@pytest.mark.parametrize("usable,expected", [
    ({"flash_attn", "flex", "torch_varlen"}, "flash_attn"),
    ({"flex", "torch_varlen"}, "flex"),
    ({"torch_varlen"}, "torch_varlen"),
    (set(), "segmented"),
])
def test_auto_order_on_cuda(monkeypatch, usable, expected):
    module = importlib.import_module("megapmp.model.attention")  # megapmp.model.attention is also a function
    for name, probe in (("flash_attn", "flash_attn_usable"), ("flex", "flex_usable"),
                        ("torch_varlen", "torch_varlen_usable")):
        monkeypatch.setattr(module, probe, lambda ok=name in usable, name=name: (ok, f"{name} probe"))
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16) == expected
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16) == "segmented"
    chosen, why = select_attention_backend("auto", "cuda", torch.bfloat16)
    assert chosen == expected and (("skipped" in why) == (expected == "segmented"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flash_attn", "flex", "torch_varlen", "segmented"])
@pytest.mark.parametrize("layout", ["duplicated", "shared-prefix"])
def test_gpu_backend_matches_dense_reference_bf16(backend, layout):
    ok, reason = backend_available(backend, "cuda", torch.bfloat16)
    if not ok:
        pytest.skip(reason)
    attn = packed_attn(layout, n_pairs=24, seq_len=512, lengths=(1, 60)).to("cuda")
    q, k, v = (t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in qkv(attn, 8, 2, dim=64))
    grad_out = torch.randn_like(q)
    expected = run("sdpa", *(t.float().detach().requires_grad_() for t in (q, k, v)), attn, grad_out.float())
    got = run(backend, q, k, v, attn, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        # bf16 operands: ~3 significant digits; relative to the reference's scale
        assert (a.float() - b).norm() / b.norm() < 2e-2, name


# ---------------------------------------------------------------- accelerators and fast paths


def test_detection_never_raises_and_reports_reasons():
    probes = detect_accelerators()
    assert set(probes) == {"torch", "flash_attn", "flex", "torch_varlen", "apex_adam", "triton"}
    # what no code path uses is not reported as if it could be (issue 18: claim only what runs)
    assert not {"transformer_engine", "apex_rmsnorm"} & set(probes)
    for name, probe in probes.items():
        assert isinstance(probe, Probe) and probe.detail, name
    assert probes["torch"].available and probes["torch"].version == torch.__version__


def test_select_attention_backend():
    chosen, why = select_attention_backend("auto", "cpu", torch.float32)
    assert chosen == "segmented" and "auto picks flex on CUDA only" in why  # flex runs on CPU, forward only
    assert select_attention_backend("flex", "cpu") == ("flex", "requested")
    assert select_attention_backend("sdpa", "cpu") == ("sdpa", "requested")
    with pytest.raises(ValueError, match="cannot run here"):
        select_attention_backend("flash_attn", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown"):
        select_attention_backend("xformers", "cpu")


def test_backend_report_line():
    report = backend_report("cpu", torch.float32, "auto", optimizer_backend="torch.AdamW")
    line = format_report(report)
    assert report["attention"]["chosen"] == "segmented"
    assert line.startswith("backends: attention segmented (auto") and "optimizer torch.AdamW" in line
    assert "installed: torch=" in line and "flash_attn=" in line


def test_attention_benchmark_runs_and_checks_parity_on_cpu():
    benchmark_attention = load_tool("bench_attention").benchmark_attention
    threads = torch.get_num_threads()
    records = benchmark_attention("cpu", seq_len=64, pairs=6, lengths=(2, 9), heads=2, kv_heads=1, head_dim=8,
                                  steps=1, backends=["sdpa", "segmented", "flash_attn"])
    assert torch.get_num_threads() == threads
    timed = [r for r in records if "seconds" in r]
    assert {(r["layout"], r["backend"]) for r in timed} == {(lay, be) for lay in ("duplicated", "shared-prefix")
                                                            for be in ("sdpa", "segmented")}
    assert all(r["rel_err_out"] < 1e-5 and r["rel_err_dq"] < 1e-5 for r in timed)
    assert sum("skipped" in r for r in records) == 2  # flash_attn, both layouts


def test_config_names_exactly_the_registered_attention_backends():
    # config.py validates attention_backend without importing model code: its list must be the registry's.
    from megapmp.config import ATTENTION_BACKEND_NAMES
    from megapmp.model import ATTENTION_BACKENDS

    assert sorted(ATTENTION_BACKEND_NAMES) == sorted(ATTENTION_BACKENDS)
