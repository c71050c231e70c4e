"""Model FLOPs (Megatron's formula on real per-document lengths) and MFU."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megapmp.config import model_preset
from megapmp.data.datasets import Pair
from megapmp.data.packing import IGNORE_INDEX, pack_pairs
from megapmp.flops import (attention_pairs, batch_flops, mfu, peak_flops, peak_flops_for_name,
                           per_token_gemm_flops, step_flops)

TINY = model_preset("tiny")  # h 64, ffn 176, 2 layers, 4 heads x 16, 2 kv heads, vocab 384


def one_row(lengths_and_branches, seq_len, lm_targets=0, pairs=0):
    segment_ids, branch_ids = [], []
    for segment, branches in enumerate(lengths_and_branches):
        segment_ids += [segment] * len(branches)
        branch_ids += branches
    pad = seq_len - len(segment_ids)
    labels = np.full((1, seq_len), IGNORE_INDEX)
    labels[0, :lm_targets] = 1
    return SimpleNamespace(segment_ids=np.array([segment_ids + [-1] * pad]), branch_ids=np.array([branch_ids + [0] * pad]),
                           labels=labels, chosen_index=np.zeros(pairs, np.int64))


def test_hand_computed_tiny_config_one_segment():
    # One causal segment of 10 tokens, 6 padding, 4 LM targets, no pairs.
    batch = one_row([[0] * 10], 16, lm_targets=4)
    per_layer = 2 * 64 * (64 + 2 * 32) + 2 * 64 * 64 + 2 * 64 * 176 * 3  # QKV, out, SwiGLU = 92160
    assert per_token_gemm_flops(TINY) == 2 * per_layer
    flops = batch_flops(TINY, batch)
    assert flops.gemm == 3 * 184320 * 10  # padding counts zero
    assert flops.attention == 3 * 4 * 64 * (10 * 10 / 2) * 2  # Megatron: causal = half the square
    assert flops.lm_head == 3 * 2 * 64 * 384 * 4
    assert flops.reward_head == 0
    assert flops.total == 5_529_600 + 76_800 + 589_824 == step_flops(TINY, batch)
    assert batch_flops(TINY, batch, causal="exact").attention == 3 * 4 * 64 * 55 * 2
    assert batch_flops(TINY, batch, lm_head=False).lm_head == 0


def test_equals_megatron_formula_on_unpacked_full_rows():
    """B rows of s tokens, no padding, LM loss on every token: exactly Megatron-LM's transformer_flops
    (dense, SwiGLU, GQA; logits at our vocabulary size)."""
    config = model_preset("qwen2-0.5b")
    b, s = 3, 32
    batch = SimpleNamespace(segment_ids=np.zeros((b, s), np.int32), branch_ids=np.zeros((b, s), np.int8),
                            labels=np.ones((b, s), np.int64), chosen_index=np.zeros(0, np.int64))
    h, ffn, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    megatron = b * s * (3 * 2 * h * ffn * 3 * layers
                        + layers * 3 * 2 * (h * (q + kv + kv) + q * s / 2 * 2 + q * h)
                        + 3 * 2 * h * vocab)
    assert step_flops(config, batch, reward_head=False) == pytest.approx(megatron, rel=1e-12)


def random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Pair(*(np.arange(rng.integers(1, 30)) + 2 for _ in range(3))) for _ in range(n)]


def test_packing_does_not_change_flops():
    pairs = random_pairs(9)
    packed = pack_pairs(pairs, 128, "duplicated", pad_id=0)
    assert packed.shape[0] > 1
    alone = []
    for p in pairs:
        n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
        # [P C] with its c LM targets and the pair's two reward read-outs; [P R] alone, no targets.
        alone.append(one_row([[0] * (n_p + n_c)], n_p + n_c, lm_targets=n_c, pairs=1))
        alone.append(one_row([[0] * (n_p + n_r)], n_p + n_r))
    assert step_flops(TINY, packed) == pytest.approx(step_flops(TINY, alone), rel=1e-12)
    # more padding (longer rows) changes nothing either
    assert step_flops(TINY, pack_pairs(pairs, 512, "duplicated", 0)) == pytest.approx(step_flops(TINY, packed), rel=1e-12)
    # torch batches count the same as numpy ones
    assert step_flops(TINY, packed.to_torch()) == step_flops(TINY, packed)


def test_shared_prefix_counts_the_prompt_once():
    pairs = random_pairs(9, seed=1)
    dup = batch_flops(TINY, pack_pairs(pairs, 128, "duplicated", 0))
    shared = batch_flops(TINY, pack_pairs(pairs, 128, "shared-prefix", 0))
    prompts = np.array([len(p.prompt) for p in pairs], dtype=np.float64)
    assert dup.gemm - shared.gemm == pytest.approx(3 * per_token_gemm_flops(TINY) * prompts.sum(), rel=1e-12)
    # the second prompt's own causal square is the only attention the shared layout skips
    assert dup.attention - shared.attention == pytest.approx(3 * 4 * 64 * 2 * (prompts**2 / 2).sum(), rel=1e-12)
    assert (dup.lm_head, dup.reward_head) == (shared.lm_head, shared.reward_head)


def test_attention_pairs_of_a_shared_prefix_segment():
    p, c, r = 4, 3, 5
    segment_ids = np.array([[0] * (p + c + r)])
    branch_ids = np.array([[0] * p + [1] * c + [2] * r])
    assert attention_pairs(segment_ids, branch_ids, "exact") == (7 * 8 / 2) + r * p + (5 * 6 / 2)
    assert attention_pairs(segment_ids, branch_ids) == 49 / 2 + r * p + 25 / 2
    # and equals the count of True entries of the dense mask in the exact convention
    from megapmp.model import build_mask

    assert build_mask(torch.from_numpy(segment_ids), torch.from_numpy(branch_ids)).sum() == 28 + 20 + 15
    with pytest.raises(ValueError, match="causal"):
        attention_pairs(segment_ids, branch_ids, "full")


def test_peaks_and_mfu():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989.4e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=100) == 100e12
    assert mfu(465.9e12 * 2, 1.0, 989.4e12, num_devices=2) == pytest.approx(0.4709, abs=1e-4)
    assert mfu(1e12, 1.0, None) is None
