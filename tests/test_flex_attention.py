"""The FlexAttention backend: its mask rule, its forward on CPU, and (with CUDA) the compiled kernel.

FlexAttention has no backward on CPU in this torch, so on CPU:
- the forward is compared with the dense reference (``sdpa``) and with ``segmented``;
- the mask_mod is turned into a dense mask (``create_mask``, the same function the BlockMask is built
  from) and compared with ``build_mask`` exactly, and SDPA's gradients with that dense mask are
  compared with ``segmented``'s: this is how the rule's gradients are tested without a GPU.
The CUDA tests run the compiled kernel forward and backward in bf16.

Tolerance: fp32 on CPU, atol 1e-5 (as tests/test_attention_backends.py): the same softmax over the same
keys, summed in another order, ~1e-6 on these O(1) inputs. bf16 on CUDA: relative error < 2e-2.
"""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from megapmp.convert.hf import from_hf_config, from_hf_state_dict
from megapmp.data.datasets import Pair
from megapmp.data.packing import flatten_rows, pack_pairs
from megapmp.model import AttentionInputs, Qwen2RewardModel, attention, build_mask
from megapmp.model.attention import (FLEX_MASK_IN_COMPILED_REGION, FLEX_NO_CPU_BACKWARD, PAD_SEGMENT,
                                     SHARED_BRANCH, backend_available, packed_rows_mask_mod, prepare_attention,
                                     resolve_attention_backend)

attention_module = importlib.import_module("megapmp.model.attention")  # megapmp.model.attention is also a function
ATOL = 1e-5
LAYOUTS = ["duplicated", "shared-prefix"]
PACKINGS = ["rows", "flat"]


def make_pairs(seed, n_pairs, lengths):
    rng = np.random.default_rng(seed)
    return [Pair(*(rng.integers(2, 50, rng.integers(*lengths)) for _ in range(3))) for _ in range(n_pairs)]


def packed_batch(layout, packing, seed=0, n_pairs=9, seq_len=77, lengths=(1, 14)):
    """Rows of seq_len (R > 1, padding at each row's end) or one flat row padded to a multiple of 50;
    neither length is a multiple of FlexAttention's 128-token blocks."""
    batch = pack_pairs(make_pairs(seed, n_pairs, lengths), seq_len, layout, pad_id=0)
    if packing == "flat":
        batch = flatten_rows(batch, pad_id=0, multiple=50)
    return batch


def inputs_of(batch) -> AttentionInputs:
    return AttentionInputs.from_segments(batch.segment_ids, batch.branch_ids)


@pytest.fixture(scope="module")
def batches():
    """One AttentionInputs per (layout, packing), shared: each builds its BlockMask once (seconds on CPU)."""
    out = {}
    for layout in LAYOUTS:
        for packing in PACKINGS:
            attn = inputs_of(packed_batch(layout, packing))
            rows, seq_len = attn.shape
            assert seq_len % 128 and (rows > 1) == (packing == "rows")
            assert bool((attn.segment_ids == PAD_SEGMENT).any())  # padding at row ends / the flat tail
            out[layout, packing] = attn
    return out


def qkv(attn, heads, kv_heads, dim=16, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    rows, seq_len = attn.shape
    make = lambda h: torch.randn(rows, seq_len, h, dim, generator=generator).requires_grad_(requires_grad)
    return make(heads), make(kv_heads), make(kv_heads)


# ---------------------------------------------------------------- forward on CPU


@pytest.mark.parametrize("layout,packing,heads,kv_heads", [
    *((layout, packing, 4, 2) for layout in LAYOUTS for packing in PACKINGS),  # GQA: 2 query heads per kv head
    ("shared-prefix", "flat", 4, 4),
])
def test_flex_forward_matches_dense_reference_and_segmented(batches, layout, packing, heads, kv_heads):
    attn = batches[layout, packing]
    q, k, v = qkv(attn, heads, kv_heads)
    with torch.no_grad():
        got = attention(q, k, v, attn, "flex")
        for reference in ("sdpa", "segmented"):
            torch.testing.assert_close(got, attention(q, k, v, attn, reference), rtol=0, atol=ATOL, msg=reference)


def test_flex_handles_branch_patterns_the_varlen_backends_cannot():
    # shared tokens after a response: no varlen decomposition, but flex evaluates the rule itself
    attn = AttentionInputs.from_segments([[0, 0, 0, 0, -1]], [[0, 1, 0, 2, 0]])
    assert attn.varlen_plan() is None
    q, k, v = qkv(attn, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, attn, "flex"), attention(q, k, v, attn, "sdpa"),
                                   rtol=0, atol=ATOL)


def test_flex_casts_to_the_autocast_dtype_like_the_varlen_path(batches):
    # Under autocast the RoPE'd q/k are fp32 while v comes out of a bf16 linear: flex needs one dtype.
    attn = batches["shared-prefix", "rows"]
    q, k, v = qkv(attn, 4, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v.bfloat16(), attn, "flex")
        expected = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn, "flex")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_flex_refuses_gradients_on_cpu_with_a_clear_error(batches):
    attn = batches["duplicated", "rows"]
    q, k, v = qkv(attn, 4, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward on CPU.*use attention_backend segmented") as info:
        attention(q, k, v, attn, "flex")
    assert str(info.value) == FLEX_NO_CPU_BACKWARD
    with torch.no_grad():
        attention(q, k, v, attn, "flex")  # the forward alone is fine


def test_block_mask_is_built_once_per_inputs_and_device(monkeypatch):
    attn = inputs_of(packed_batch("shared-prefix", "rows", seed=1))
    builds = []
    real_build = attention_module.build_block_mask
    monkeypatch.setattr(attention_module, "build_block_mask", lambda *a: builds.append(1) or real_build(*a))
    q, k, v = qkv(attn, 4, 2)
    with torch.no_grad():
        for _layer in range(3):
            attention(q, k, v, attn, "flex")
    assert len(builds) == 1
    assert attn.flex_block_mask() is attn.flex_block_mask("cpu")
    assert inputs_of(packed_batch("shared-prefix", "rows", seed=1)).flex_block_mask() is not attn.flex_block_mask()


def test_availability_and_auto_on_cpu():
    ok, reason = backend_available("flex", "cpu", torch.float32)
    assert ok and "forward only" in reason
    assert resolve_attention_backend("auto", "cpu", torch.float32) == "segmented"  # never flex on CPU
    assert not backend_available("flex", "meta")[0]


# ---------------------------------------------------------------- the mask rule, and its gradients


def mask_mod_without_branch_rule(segment_ids, branch_ids):
    """A deliberately broken rule (R sees C): what the tests below must tell apart from the real one."""

    def mask_mod(b, h, q_idx, kv_idx):
        seg_q, seg_k = segment_ids[b, q_idx], segment_ids[b, kv_idx]
        same_segment = (seg_q == seg_k) & (seg_q != PAD_SEGMENT)
        return (same_segment & (kv_idx <= q_idx)) | ((seg_q == PAD_SEGMENT) & (q_idx == kv_idx))

    return mask_mod


def dense_mask_of(factory, attn):
    rows, seq_len = attn.shape
    return create_mask(factory(attn.segment_ids, attn.branch_ids), rows, None, seq_len, seq_len, device="cpu")


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_mod_is_exactly_build_mask(batches, layout, packing):
    attn = batches[layout, packing]
    expected = build_mask(attn.segment_ids, attn.branch_ids)
    assert torch.equal(dense_mask_of(packed_rows_mask_mod, attn), expected)
    broken = dense_mask_of(mask_mod_without_branch_rule, attn)
    has_branches = bool((attn.branch_ids != SHARED_BRANCH).any())
    assert has_branches == (layout == "shared-prefix")
    assert torch.equal(broken, expected) != has_branches  # the broken rule shows up exactly where R meets C


@pytest.mark.parametrize("heads,kv_heads", [(4, 2)])
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_mod_gradients_match_segmented(batches, layout, packing, heads, kv_heads):
    attn = batches[layout, packing]
    q, k, v = qkv(attn, heads, kv_heads, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def dense(factory):
        mask = dense_mask_of(factory, attn)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                             enable_gqa=True).transpose(1, 2)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    segmented = attention(q, k, v, attn, "segmented")
    expected = (segmented, *torch.autograd.grad(segmented, (q, k, v), grad_out))
    for name, got, want in zip(("out", "dq", "dk", "dv"), dense(packed_rows_mask_mod), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=name)
    if layout == "shared-prefix":
        broken_dq = dense(mask_mod_without_branch_rule)[1]
        assert (broken_dq - expected[1]).abs().max() > 1e-2


# ---------------------------------------------------------------- the whole model against transformers


def our_model(hf, backend) -> Qwen2RewardModel:
    config = from_hf_config(hf.config.to_dict())
    model = Qwen2RewardModel(config, attention_backend=backend)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config).state_dict)
    return model.eval()


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_model_rewards_match_hf_sequence_classification(layout, packing):
    """Rewards read at each response's last token equal HF's scores of [P C] and [P R] alone."""
    pytest.importorskip("transformers")  # optional on a GPU machine: the rest of this file does not need it
    from transformers import Qwen2ForSequenceClassification

    from test_convert_hf import VOCAB, hf_model, hf_padded_batch, random_sequences

    hf = hf_model(Qwen2ForSequenceClassification, tied=True, seed=40)
    ours = our_model(hf, "flex")
    generator = torch.Generator().manual_seed(41)
    prompts = [torch.randint(2, VOCAB, (n,), generator=generator) for n in (3, 6, 2, 5, 4)]  # no PAD, no EOS
    responses = random_sequences([4, 2, 5, 3, 6, 2, 3, 4, 5, 3], seed=42)  # each ends with EOS
    pairs = [Pair(p.numpy(), responses[2 * i].numpy(), responses[2 * i + 1].numpy()) for i, p in enumerate(prompts)]
    batch = pack_pairs(pairs, 23, layout, pad_id=0)
    if packing == "flat":
        batch = flatten_rows(batch, pad_id=0, multiple=32)
    batch = batch.to_torch()
    attn = inputs_of(batch)
    with torch.no_grad():
        rewards = ours.rewards(ours(batch.input_ids, batch.position_ids, attn)).reshape(-1)
        read = torch.stack([batch.chosen_index, batch.rejected_index], 1).reshape(-1)
        plain = [torch.cat([torch.as_tensor(pair.prompt), torch.as_tensor(response)])
                 for pair in pairs for response in (pair.chosen, pair.rejected)]
        hf_scores = hf(*hf_padded_batch(plain)).logits[:, 0]
    torch.testing.assert_close(rewards[read], hf_scores, rtol=0, atol=ATOL)
    assert hf_scores.std() > 1e-2


# ---------------------------------------------------------------- inside a compiled region


def test_compiled_region_traces_flex_with_a_prebuilt_mask_and_refuses_a_cold_one(batches):
    """What regional torch.compile of a decoder block sees (dynamo's eager backend: no C++ compiler needed)."""
    attn = batches["shared-prefix", "rows"]
    q, k, v = qkv(attn, 4, 2)
    block = torch.compile(lambda q, k, v, attn: attention(q * 2.0, k, v, attn, "flex"), backend="eager",
                          fullgraph=True)
    with torch.no_grad():
        assert prepare_attention(attn, "flex", q.device) == "flex" and q.device in attn._block_mask_cache
        torch.testing.assert_close(block(q, k, v, attn), attention(q * 2.0, k, v, attn, "sdpa"), rtol=0, atol=ATOL)
        cold = inputs_of(packed_batch("shared-prefix", "rows", seed=2))
        with pytest.raises(Exception, match="call attn.flex_block_mask"):
            block(*qkv(cold, 4, 2), cold)
    assert FLEX_MASK_IN_COMPILED_REGION.startswith("the flex block mask")


# ---------------------------------------------------------------- the compiled kernel (CUDA)

needs_cuda = pytest.mark.cuda  # skipped without a GPU (conftest); tools/gpu_check.sh runs these


def cuda_batch(layout, packing, seed=0):
    batch = pack_pairs(make_pairs(seed, 40, (20, 160)), 1000, layout, pad_id=0)
    if packing == "flat":
        batch = flatten_rows(batch, pad_id=0, multiple=256)
    return inputs_of(batch).to("cuda")


def bf16_qkv(attn, seed=0):
    q, k, v = qkv(attn, 8, 2, dim=64, seed=seed)
    return tuple(t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))


def fwd_bwd(backend, q, k, v, attn, grad_out):
    out = attention(q, k, v, attn, backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@needs_cuda
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_flex_forward_and_backward_match_segmented_bf16(layout, packing):
    ok, reason = backend_available("flex", "cuda", torch.bfloat16)
    if not ok:
        pytest.skip(reason)
    attn = cuda_batch(layout, packing)
    q, k, v = bf16_qkv(attn)
    grad_out = torch.randn_like(q)
    got = fwd_bwd("flex", q, k, v, attn, grad_out)
    expected = fwd_bwd("segmented", *(t.float().detach().requires_grad_() for t in (q, k, v)), attn, grad_out.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == torch.bfloat16, name
        assert (a.float() - b).norm() / b.norm() < 2e-2, name


@needs_cuda
def test_gpu_flex_does_not_recompile_for_a_new_batch_of_the_same_padded_length():
    from torch._dynamo.utils import counters

    if not backend_available("flex", "cuda", torch.bfloat16)[0]:
        pytest.skip(backend_available("flex", "cuda", torch.bfloat16)[1])
    first, second = (inputs_of(packed_batch("shared-prefix", "rows", seed=s, n_pairs=40, seq_len=700,
                                            lengths=(10, 120))) for s in (3, 4))
    rows = min(first.shape[0], second.shape[0])
    first, second = (AttentionInputs.from_segments(a.segment_ids[:rows], a.branch_ids[:rows]).to("cuda")
                     for a in (first, second))
    assert not torch.equal(first.segment_ids, second.segment_ids)
    for i, attn in enumerate((first, second)):
        q, k, v = bf16_qkv(attn, seed=i)
        fwd_bwd("flex", q, k, v, attn, torch.randn_like(q))
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


@needs_cuda
def test_gpu_auto_prefers_flex_over_torch_varlen_and_uses_it_for_odd_branch_patterns():
    from megapmp.model.attention import flash_attn_usable, flex_usable

    if flash_attn_usable()[0] or not flex_usable()[0]:
        pytest.skip("flash_attn installed or flex unusable: auto picks another backend")
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16) == "flex"
    attn = AttentionInputs.from_segments([[0] * 5 + [-1] * 3], [[0, 1, 0, 2, 0, 0, 0, 0]]).to("cuda")
    q, k, v = bf16_qkv(attn)
    grad_out = torch.randn_like(q)
    got = fwd_bwd("auto", q, k, v, attn, grad_out)
    expected = fwd_bwd("sdpa", *(t.float().detach().requires_grad_() for t in (q, k, v)), attn, grad_out.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert (a.float() - b).norm() / b.norm() < 2e-2, name

