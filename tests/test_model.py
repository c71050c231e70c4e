"""Single-device model: config validation, init, the packed-row attention rule, checkpointing.

Tolerance: fp32 on CPU, atol 1e-5. A packed row and the same sequence alone run the same math
on different tensor shapes, so only summation order (GEMM blocking, softmax over masked vs
absent keys) differs: ~1e-6 on these O(1) activations.
"""
import dataclasses

import pytest
import torch

from megapmp.config import MODEL_PRESETS, ModelConfig, model_preset
from megapmp.model import AttentionInputs, Qwen2RewardModel, build_mask

ATOL = 1e-5


def make_model(seed=0, **kwargs) -> Qwen2RewardModel:
    torch.manual_seed(seed)
    model = Qwen2RewardModel(model_preset("tiny"), **kwargs)
    model.init_weights()
    # Non-trivial norms and biases, so a wrong key or a skipped op shows up in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def plain(model, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states [n, H] of one sequence alone in a row of its own length."""
    n = tokens.numel()
    attn = AttentionInputs.for_padded_causal([n], n)
    return model(tokens[None], torch.arange(n)[None], attn)[0]


# ---------------------------------------------------------------- config


def test_validate_names_every_offending_value():
    bad = ModelConfig(
        vocab_size=0,
        hidden_size=66,
        num_attention_heads=4,
        num_key_value_heads=3,
        rms_norm_eps=-1.0,
        num_hidden_layers=2.5,
    )
    with pytest.raises(ValueError) as info:
        bad.validate()
    message = str(info.value)
    for fragment in (
        "vocab_size=0",
        "hidden_size=66 is not divisible by num_attention_heads=4",
        "num_attention_heads=4 is not divisible by num_key_value_heads=3",
        "rms_norm_eps=-1.0",
        "num_hidden_layers=2.5",
    ):
        assert fragment in message


def test_validate_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim=3"):
        ModelConfig(hidden_size=12, num_attention_heads=4, num_key_value_heads=2).validate()


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_are_valid_and_copied(name):
    config = model_preset(name)
    config.validate()
    config.hidden_size = 8
    assert MODEL_PRESETS[name].hidden_size != 8


def test_qwen2_presets_mirror_hf_config_json():
    q15, q7 = model_preset("qwen2-1.5b"), model_preset("qwen2-7b")
    assert (q15.hidden_size, q15.intermediate_size, q15.num_hidden_layers) == (1536, 8960, 28)
    assert (q15.num_attention_heads, q15.num_key_value_heads, q15.head_dim) == (12, 2, 128)
    assert q15.tie_word_embeddings and q15.vocab_size == 151936
    assert (q7.hidden_size, q7.intermediate_size, q7.num_attention_heads, q7.num_key_value_heads) == (
        3584, 18944, 28, 4)
    assert not q7.tie_word_embeddings and q7.vocab_size == 152064
    assert q7.rope_theta == 1e6 and q7.max_position_embeddings == 131072


# ---------------------------------------------------------------- init


def test_meta_init_then_init_weights():
    config = model_preset("tiny")
    with torch.device("meta"):
        model = Qwen2RewardModel(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()

    assert model.lm_head.weight is model.embed_tokens.weight
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() >= 4096:
            assert abs(p.std().item() - config.initializer_range) < 0.1 * config.initializer_range, name
            assert abs(p.mean().item()) < 0.1 * config.initializer_range, name

    # The RoPE table is rebuilt, so the meta-built model computes what an eagerly built one does.
    eager = Qwen2RewardModel(config)
    eager.load_state_dict(model.state_dict())
    assert torch.equal(model.rotary.inv_freq, eager.rotary.inv_freq)
    attn = AttentionInputs.for_padded_causal([7, 4], 7)
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    positions = attn.default_position_ids()
    torch.testing.assert_close(model(tokens, positions, attn), eager(tokens, positions, attn), rtol=0, atol=0)


def test_untied_model_has_own_lm_head():
    config = dataclasses.replace(model_preset("tiny"), tie_word_embeddings=False)
    model = Qwen2RewardModel(config)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert "lm_head.weight" in dict(model.named_parameters())


# ---------------------------------------------------------------- attention rule

# One row: segment 0 is a shared-prefix pair [P P C C R R], segment 1 a plain pair of tokens, then padding.
SHARED_PREFIX_ROW = dict(
    segment_ids=[[0, 0, 0, 0, 0, 0, 1, 1, -1]],
    branch_ids=[[0, 0, 1, 1, 2, 2, 0, 0, 0]],
)
SHARED_PREFIX_MASK = [  # query rows, key columns
    # P P C C R R X X pad
    [1, 0, 0, 0, 0, 0, 0, 0, 0],  # P0
    [1, 1, 0, 0, 0, 0, 0, 0, 0],  # P1
    [1, 1, 1, 0, 0, 0, 0, 0, 0],  # C2
    [1, 1, 1, 1, 0, 0, 0, 0, 0],  # C3
    [1, 1, 0, 0, 1, 0, 0, 0, 0],  # R4 sees P, not C
    [1, 1, 0, 0, 1, 1, 0, 0, 0],  # R5
    [0, 0, 0, 0, 0, 0, 1, 0, 0],  # X6 starts a new segment
    [0, 0, 0, 0, 0, 0, 1, 1, 0],  # X7
    [0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding sees only itself
]


def test_mask_on_shared_prefix_example():
    attn = AttentionInputs.from_segments(**SHARED_PREFIX_ROW)
    expected = torch.tensor(SHARED_PREFIX_MASK, dtype=torch.bool)[None, None]
    assert torch.equal(attn.mask(), expected)
    assert attn.mask() is attn.mask()  # cached: built once per micro-batch, not per layer
    assert attn.cu_seqlens.tolist() == [0, 6, 8, 9]
    assert attn.max_seqlen == 6
    # R's positions continue from the end of P.
    assert attn.default_position_ids().tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 0]]


def test_mask_matches_rule_elementwise_on_random_rows():
    torch.manual_seed(0)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    branch_ids = torch.randint(0, 3, segment_ids.shape)
    mask = build_mask(segment_ids, branch_ids)[:, 0]
    for r in range(2):
        for q in range(8):
            for k in range(8):
                seg_q, seg_k = segment_ids[r, q].item(), segment_ids[r, k].item()
                if seg_q == -1:
                    allowed = q == k
                else:
                    allowed = (seg_q == seg_k and k <= q
                               and branch_ids[r, k].item() in (0, branch_ids[r, q].item()))
                assert mask[r, q, k].item() == allowed, (r, q, k)


def test_from_segments_rejects_split_segment_and_bad_branch():
    with pytest.raises(ValueError, match="split"):
        AttentionInputs.from_segments([[0, 0, 1, 0]])
    for bad in (-1, 128):  # 128 would wrap to -128 in the int8 ids: refused before the cast
        with pytest.raises(ValueError, match=r"branch ids outside \[0, 127\]"):
            AttentionInputs.from_segments([[0, 0]], [[0, bad]])
    AttentionInputs.from_segments([[0, 0, 0]], [[0, 3, 127]])  # a group row's responses 1 .. 127


# ---------------------------------------------------------------- packed rows == sequences alone


def test_packed_segments_equal_each_sequence_alone():
    model = make_model()
    torch.manual_seed(1)
    a, b = torch.randint(0, 384, (5,)), torch.randint(0, 384, (7,))
    attn = AttentionInputs.from_segment_lengths([[5, 7], [7]], 15)
    tokens = torch.zeros(2, 15, dtype=torch.long)
    tokens[0, :5], tokens[0, 5:12], tokens[1, :7] = a, b, b
    with torch.no_grad():
        hidden = model(tokens, attn.default_position_ids(), attn)
        torch.testing.assert_close(hidden[0, :5], plain(model, a), rtol=0, atol=ATOL)
        torch.testing.assert_close(hidden[0, 5:12], plain(model, b), rtol=0, atol=ATOL)
        torch.testing.assert_close(hidden[1, :7], plain(model, b), rtol=0, atol=ATOL)
        assert torch.isfinite(hidden).all()  # padding rows stay finite


def test_shared_prefix_equals_two_plain_sequences():
    model = make_model()
    torch.manual_seed(2)
    p, c, r = (torch.randint(0, 384, (n,)) for n in (4, 3, 5))
    n = 4 + 3 + 5
    # Row: [P C R] pair, then a plain sequence [C P] as a second segment, then padding.
    segment_ids = [0] * n + [1] * 7 + [-1] * 2
    branch_ids = [0] * 4 + [1] * 3 + [2] * 5 + [0] * 9
    attn = AttentionInputs.from_segments([segment_ids], [branch_ids])
    tokens = torch.cat([p, c, r, c, p, torch.zeros(2, dtype=torch.long)])[None]
    positions = attn.default_position_ids()
    assert positions[0, :n].tolist() == list(range(7)) + list(range(4, 9))
    with torch.no_grad():
        hidden = model(tokens, positions, attn)[0]
        prompt_chosen = plain(model, torch.cat([p, c]))
        prompt_rejected = plain(model, torch.cat([p, r]))
        torch.testing.assert_close(hidden[:7], prompt_chosen, rtol=0, atol=ATOL)
        torch.testing.assert_close(hidden[7:n], prompt_rejected[4:], rtol=0, atol=ATOL)
        torch.testing.assert_close(hidden[n:n + 7], plain(model, torch.cat([c, p])), rtol=0, atol=ATOL)
        # The check has teeth: letting R see C changes R's hidden states.
        leaky = AttentionInputs.from_segments([segment_ids], [[0] * len(segment_ids)])
        assert (model(tokens, positions, leaky)[0, 7:n] - hidden[7:n]).abs().max() > 1e-3


# ---------------------------------------------------------------- heads, stages, checkpointing


def test_heads_shapes_and_fp32_rewards_in_bf16():
    model = make_model().to(torch.bfloat16)
    attn = AttentionInputs.for_padded_causal([6, 3], 6)
    hidden = model(torch.randint(0, 384, (2, 6)), attn.default_position_ids(), attn)
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (2, 6, 64)
    assert model.lm_logits(hidden).shape == (2, 6, 384)
    rewards = model.rewards(hidden)
    assert rewards.dtype == torch.float32 and rewards.shape == (2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.rewards(hidden), rewards)  # autocast does not drag it to bf16


def test_pipeline_stages_compose_to_full_model():
    full = make_model()
    state = full.state_dict()
    config = model_preset("tiny")
    first = Qwen2RewardModel(config, layer_ids=[0], with_final_norm=False, with_lm_head=False, with_score=False)
    last = Qwen2RewardModel(config, layer_ids=[1], with_embedding=False)
    assert list(first.layers.keys()) == ["0"] and list(last.layers.keys()) == ["1"]
    for stage in (first, last):
        own = stage.state_dict().keys()
        stage.load_state_dict({k: v for k, v in state.items() if k in own})
    attn = AttentionInputs.from_segment_lengths([[4, 5]], 10)
    tokens, positions = torch.randint(0, 384, (1, 10)), attn.default_position_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            last(first.eval()(tokens, positions, attn), positions, attn),
            full(tokens, positions, attn), rtol=0, atol=0)


def test_activation_checkpointing_gives_identical_grads():
    torch.manual_seed(3)
    tokens = torch.randint(0, 384, (2, 9))
    attn = AttentionInputs.from_segments(
        [[0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, -1, -1]],
        [[0, 0, 1, 1, 2, 2, 0, 0, 0], [0] * 9],
    )
    positions = attn.default_position_ids()

    grads, layer_calls = [], []
    for checkpointing in (False, True):
        model = make_model(activation_checkpointing=checkpointing).train()
        calls = []
        model.layers["0"].register_forward_pre_hook(lambda *_: calls.append(1))
        hidden = model(tokens, positions, attn)
        loss = model.rewards(hidden).sum() + model.lm_logits(hidden).logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # the checkpointed layer really was recomputed in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)
