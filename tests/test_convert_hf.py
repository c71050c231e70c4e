"""HF Qwen2 <-> megapmp conversion, checked against tiny random transformers models (no downloads).

Tolerance: fp32 on CPU, atol 1e-5 on logits and rewards. HF runs each sequence in a right-padded
batch, we run several sequences packed into one row; the math is the same but tensor shapes (and
so summation order) differ, which moves O(1) outputs by ~1e-6. Weight round trips are bitwise.
"""
import dataclasses
import json
import pickle

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from megapmp.config import MODEL_PRESETS, ModelConfig, model_preset
from megapmp.convert.hf import (
    from_hf_config,
    from_hf_state_dict,
    load_hf_directory,
    load_hf_state_dict,
    save_hf_directory,
    to_hf_config,
    to_hf_state_dict,
)
from megapmp.model import AttentionInputs, Qwen2RewardModel

ATOL = 1e-5
VOCAB, PAD, EOS = 101, 0, 1


def tiny_hf_config(tied: bool, pad_token_id: int = PAD) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per kv head
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        initializer_range=0.1,  # larger than 0.02 so attention is far from uniform
        num_labels=1,
        pad_token_id=pad_token_id,
        eos_token_id=EOS,
        attn_implementation="eager",
    )


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF-init weights plus random biases and norm weights, so none of them is trivially 0 or 1."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.1)
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()


def hf_model(cls, tied: bool, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    return randomise(cls(tiny_hf_config(tied, **config_kwargs)), seed + 1)


def our_model_from(hf_state_dict, hf_config: Qwen2Config) -> Qwen2RewardModel:
    config = from_hf_config(hf_config.to_dict())
    model = Qwen2RewardModel(config)
    model.load_state_dict(from_hf_state_dict(hf_state_dict, config).state_dict)
    return model.eval()


def random_sequences(lengths, seed):
    """Token sequences that end with EOS and contain neither PAD nor another EOS."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(2, VOCAB, (n - 1,), generator=generator), torch.tensor([EOS])])
            for n in lengths]


def hf_padded_batch(sequences, pad=PAD):
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)], attention_mask[i, : len(s)] = s, 1
    return input_ids, attention_mask


def pack_rows(rows, seq_len):
    """rows: list of lists of sequences -> (tokens [R, S], AttentionInputs, [(row, start, length)])."""
    attn = AttentionInputs.from_segment_lengths([[len(s) for s in row] for row in rows], seq_len)
    tokens = torch.full((len(rows), seq_len), PAD, dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            tokens[r, start : start + len(s)] = s
            spans.append((r, start, len(s)))
            start += len(s)
    return tokens, attn, spans


# ---------------------------------------------------------------- numerics against transformers


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lm_logits_match_hf_causal_lm_on_packed_rows(tied):
    hf = hf_model(Qwen2ForCausalLM, tied)
    ours = our_model_from(hf.state_dict(), hf.config)
    sequences = random_sequences([5, 9, 4, 7], seed=1)

    input_ids, attention_mask = hf_padded_batch(sequences)
    with torch.no_grad():
        hf_logits = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        tokens, attn, spans = pack_rows([[sequences[0], sequences[2]], [sequences[1]], [sequences[3]]], 12)
        our_logits = ours.lm_logits(ours(tokens, attn.default_position_ids(), attn))

    order = [0, 2, 1, 3]  # spans follow the packing order above
    for (row, start, n), i in zip(spans, order):
        torch.testing.assert_close(our_logits[row, start : start + n], hf_logits[i, :n], rtol=0, atol=ATOL)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_rewards_match_hf_sequence_classification_on_packed_rows(tied):
    hf = hf_model(Qwen2ForSequenceClassification, tied, seed=2)
    imported = from_hf_state_dict(hf.state_dict(), from_hf_config(hf.config.to_dict()))
    assert imported.has_score and imported.has_lm_head == tied
    ours = our_model_from(hf.state_dict(), hf.config)
    sequences = random_sequences([6, 3, 8, 5, 2], seed=3)

    with torch.no_grad():
        hf_scores = hf(*hf_padded_batch(sequences)).logits[:, 0]  # pooled at each row's last non-pad token
        tokens, attn, spans = pack_rows([sequences[:3], sequences[3:]], 17)
        rewards = ours.rewards(ours(tokens, attn.default_position_ids(), attn))

    ours_at_last_token = torch.stack([rewards[row, start + n - 1] for row, start, n in spans])
    torch.testing.assert_close(ours_at_last_token, hf_scores, rtol=0, atol=ATOL)
    assert hf_scores.std() > 1e-2  # different sequences really score differently


def test_shared_prefix_rewards_match_hf_on_separate_sequences():
    hf = hf_model(Qwen2ForSequenceClassification, tied=False, seed=4)
    ours = our_model_from(hf.state_dict(), hf.config)
    generator = torch.Generator().manual_seed(5)

    def tokens_(n):
        return torch.randint(2, VOCAB, (n,), generator=generator)

    pairs = [(tokens_(4), random_sequences([3], 6)[0], random_sequences([5], 7)[0]),
             (tokens_(6), random_sequences([4], 8)[0], random_sequences([2], 9)[0])]
    # One row holding both pairs in the [P C R] layout, then padding.
    segment_ids, branch_ids, row_tokens, read_at = [], [], [], []
    for segment, (p, c, r) in enumerate(pairs):
        start = len(row_tokens)
        row_tokens += [*p, *c, *r]
        segment_ids += [segment] * (len(p) + len(c) + len(r))
        branch_ids += [0] * len(p) + [1] * len(c) + [2] * len(r)
        read_at += [start + len(p) + len(c) - 1, start + len(p) + len(c) + len(r) - 1]
    padding = 3
    attn = AttentionInputs.from_segments([segment_ids + [-1] * padding], [branch_ids + [0] * padding])
    tokens = torch.tensor([row_tokens + [PAD] * padding])

    with torch.no_grad():
        rewards = ours.rewards(ours(tokens, attn.default_position_ids(), attn))[0, read_at]
        plain = [torch.cat([p, response]) for p, c, r in pairs for response in (c, r)]
        hf_scores = hf(*hf_padded_batch(plain)).logits[:, 0]
    torch.testing.assert_close(rewards, hf_scores, rtol=0, atol=ATOL)


def test_pad_equal_to_eos_breaks_hf_pooling_and_is_refused(tmp_path):
    # With pad == EOS, HF treats the closing EOS as padding and pools the token before it.
    hf = hf_model(Qwen2ForSequenceClassification, tied=True, seed=10, pad_token_id=EOS)
    ours = our_model_from(hf.state_dict(), hf.config)
    sequences = random_sequences([5, 7], seed=11)
    with torch.no_grad():
        hf_scores = hf(hf_padded_batch(sequences, pad=EOS)[0]).logits[:, 0]
        tokens, attn, spans = pack_rows([sequences], 12)
        rewards = ours.rewards(ours(tokens, attn.default_position_ids(), attn))[0]
    at_eos = torch.stack([rewards[start + n - 1] for _, start, n in spans])
    before_eos = torch.stack([rewards[start + n - 2] for _, start, n in spans])
    torch.testing.assert_close(hf_scores, before_eos, rtol=0, atol=ATOL)
    assert (hf_scores - at_eos).abs().min() > 1e-3

    config = from_hf_config(hf.config.to_dict())
    with pytest.raises(ValueError, match="pad_token_id=1 equals eos_token_id=1"):
        to_hf_config(config, pad_token_id=EOS, eos_token_id=EOS)
    with pytest.raises(ValueError, match="pad_token_id"):
        save_hf_directory(ours.state_dict(), config, tmp_path / "out", pad_token_id=EOS, eos_token_id=EOS)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- state dict and config translation


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_state_dict_round_trips_are_bitwise(tied):
    hf = hf_model(Qwen2ForSequenceClassification, tied, seed=12)
    hf_sd = hf.state_dict()
    if not tied:
        hf_sd["lm_head.weight"] = torch.randn(VOCAB, 48)
    config = from_hf_config(hf.config.to_dict())

    ours = from_hf_state_dict(hf_sd, config).state_dict
    back = to_hf_state_dict(ours, config)
    assert back.keys() == hf_sd.keys()
    for key in hf_sd:
        assert torch.equal(back[key], hf_sd[key]), key

    model = Qwen2RewardModel(config)
    model.init_weights()
    ours = model.state_dict()
    again = from_hf_state_dict(to_hf_state_dict(ours, config), config).state_dict
    assert again.keys() == ours.keys()
    for key in ours:
        assert torch.equal(again[key], ours[key]), key


def test_causal_lm_import_flags_missing_reward_head():
    hf = hf_model(Qwen2ForCausalLM, tied=False, seed=13)
    imported = from_hf_state_dict(hf.state_dict(), from_hf_config(hf.config.to_dict()))
    assert imported.has_lm_head and not imported.has_score
    assert torch.equal(imported.state_dict["score.weight"], torch.zeros(1, 48))


def test_from_hf_state_dict_names_missing_unknown_and_misshaped_keys():
    hf = hf_model(Qwen2ForSequenceClassification, tied=True, seed=14)
    config = from_hf_config(hf.config.to_dict())
    sd = hf.state_dict()
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    broken["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing keys \[model.layers.1.mlp.up_proj.weight\].*"
                                         r"unknown keys \[model.layers.2.mlp.up_proj.weight\]"):
        from_hf_state_dict(broken, config)
    misshaped = dict(sd, **{"model.norm.weight": torch.ones(47)})
    with pytest.raises(ValueError, match=r"norm.weight \(47,\) != \(48,\)"):
        from_hf_state_dict(misshaped, config)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_config_round_trip_and_transformers_agrees(name):
    config = model_preset(name)
    hf_dict = to_hf_config(config, pad_token_id=2, eos_token_id=3)
    assert from_hf_config(hf_dict) == config
    hf_config = Qwen2Config(**hf_dict)
    assert hf_config.rope_parameters["rope_theta"] == config.rope_theta
    assert hf_config.num_labels == 1 and hf_config.pad_token_id == 2
    assert from_hf_config(hf_config.to_dict()) == config


def test_public_qwen2_7b_config_json_gives_the_preset():
    # Qwen/Qwen2-7B config.json as published (transformers 4.37 era: rope_theta at top level).
    published = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 152064,
    }
    assert from_hf_config(published) == model_preset("qwen2-7b")


def test_from_hf_config_names_every_unsupported_feature():
    bad = dict(to_hf_config(model_preset("tiny"), pad_token_id=2, eos_token_id=3),
               hidden_act="gelu", use_sliding_window=True,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    del bad["vocab_size"]
    with pytest.raises(ValueError) as info:
        from_hf_config(bad)
    for fragment in ("missing vocab_size", "hidden_act='gelu'", "use_sliding_window", "rope_type='yarn'"):
        assert fragment in str(info.value)


# ---------------------------------------------------------------- directories


def our_random_model(tied: bool) -> tuple[ModelConfig, Qwen2RewardModel]:
    config = dataclasses.replace(model_preset("tiny"), vocab_size=VOCAB, tie_word_embeddings=tied,
                                 initializer_range=0.1)
    torch.manual_seed(20)
    model = Qwen2RewardModel(config)
    model.init_weights()
    return config, randomise(model, 21)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_saved_directory_loads_in_transformers_with_equal_scores(tmp_path, tied):
    config, ours = our_random_model(tied)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    out = save_hf_directory(ours.state_dict(), config, tmp_path / "export", pad_token_id=PAD,
                            eos_token_id=EOS, tokenizer_dir=tokenizer_dir, extra={"megapmp_step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok"]  # no temp dir left
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert json.loads((out / "config.json").read_text())["megapmp_step"] == 7

    hf, info = AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert isinstance(hf, Qwen2ForSequenceClassification)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    sequences = random_sequences([4, 9, 6], seed=22)
    with torch.no_grad():
        hf_scores = hf.eval()(*hf_padded_batch(sequences)).logits[:, 0]
        tokens, attn, spans = pack_rows([sequences], 19)
        rewards = ours.rewards(ours(tokens, attn.default_position_ids(), attn))[0]
    torch.testing.assert_close(torch.stack([rewards[s + n - 1] for _, s, n in spans]), hf_scores,
                               rtol=0, atol=ATOL)

    loaded_config, hf_state = load_hf_directory(out)
    assert loaded_config == config
    imported = from_hf_state_dict(hf_state, loaded_config)
    assert imported.has_score and imported.has_lm_head == tied
    loaded, expected = imported.state_dict, ours.state_dict()
    if not tied:  # the sequence classifier carries no LM head unless asked to
        expected["lm_head.weight"] = torch.zeros_like(expected["lm_head.weight"])
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


def test_save_refuses_to_clobber_and_replaces_atomically(tmp_path):
    config, ours = our_random_model(tied=False)
    out = tmp_path / "export"
    save_hf_directory(ours.state_dict(), config, out, pad_token_id=PAD, eos_token_id=EOS)
    with pytest.raises(FileExistsError):
        save_hf_directory(ours.state_dict(), config, out, pad_token_id=PAD, eos_token_id=EOS)
    with pytest.raises(ValueError, match="override"):
        save_hf_directory(ours.state_dict(), config, out, pad_token_id=PAD, eos_token_id=EOS,
                          overwrite=True, extra={"vocab_size": 5})
    save_hf_directory(ours.state_dict(), config, out, pad_token_id=PAD, eos_token_id=EOS,
                      overwrite=True, include_lm_head=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert torch.equal(load_hf_state_dict(out)["lm_head.weight"], ours.state_dict()["lm_head.weight"])


def test_loads_sharded_safetensors_and_weights_only_bin(tmp_path):
    hf = hf_model(Qwen2ForSequenceClassification, tied=False, seed=30)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    config, state = load_hf_directory(sharded)
    reference = hf.state_dict()
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key
    assert from_hf_config(hf.config.to_dict()) == config

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")
    _, state = load_hf_directory(legacy)
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_pickled_objects_in_bin_files_are_refused(tmp_path):
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_hf_state_dict(tmp_path)
