"""megapmp.convert.source: every kind of model path -> the same config and weights, checked against
independent references (the tensors as written, and transformers for HF directories)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from megapmp import checkpoint as ckpt
from megapmp.config import ModelConfig
from megapmp.convert.source import (CHECKPOINT, HF, ConvertError, SourceNotFoundError, find_model_source,
                                    init_model_from, load_model_source, scoring_recipe)
from megapmp.model import Qwen2RewardModel
from megapmp.model.attention import AttentionInputs

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_model(tied: bool, seed: int = 0) -> Qwen2RewardModel:
    torch.manual_seed(seed)
    model = Qwen2RewardModel(ModelConfig(**TINY, tie_word_embeddings=tied))
    model.init_weights()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return model


def checkpoint_state(model: Qwen2RewardModel) -> dict:
    """What the trainer writes: no lm_head.weight when tied (it is the embedding)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}


def trainer_state(model: Qwen2RewardModel, step: int) -> dict:
    return {"step": step, "skipped_steps": 0, "consecutive_nonfinite": 0, "optimizer": {}, "loader": {}, "rng": {},
            "config": {"model": asdict(model.config)}}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- megapmp checkpoints


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def run(request, tmp_path_factory):
    """A run directory with two complete checkpoints (steps 1 and 2) and a save that never finished."""
    root = tmp_path_factory.mktemp("run")
    (root / "config.json").write_text("{}")  # a run's own config.json never makes it an HF directory
    model = tiny_model(request.param)
    ckpt.save_checkpoint(root / "checkpoints", 1, model_state=checkpoint_state(tiny_model(request.param, seed=1)),
                         optimizer_tensors={}, trainer_state=trainer_state(model, 1))
    ckpt.save_checkpoint(root / "checkpoints", 2, model_state=checkpoint_state(model), optimizer_tensors={},
                         trainer_state=trainer_state(model, 2))
    (root / "checkpoints" / ".step_00000003").mkdir()
    return root, model


def test_run_checkpoints_and_step_dirs_load_the_newest_checkpoint(run):
    root, model = run
    written = load_file(root / "checkpoints" / "step_00000002" / "model.safetensors")
    for path in (root, root / "checkpoints", root / "checkpoints" / "step_00000002"):
        assert find_model_source(path) == (CHECKPOINT, root / "checkpoints" / "step_00000002")
        source = load_model_source(path)
        assert (source.kind, source.path, source.step) == (CHECKPOINT, root / "checkpoints" / "step_00000002", 2)
        assert source.config == model.config and not source.sharded
        assert_same(source.state_dict, written)
        assert source.has_reward_head and source.has_lm_head
    older = load_model_source(root / "checkpoints" / "step_00000001")
    assert older.step == 1 and not torch.equal(older.state_dict["score.weight"], written["score.weight"])


def test_sharded_checkpoint_is_gathered_into_full_tensors(run, tmp_path):
    """A TP=2 sharded checkpoint (MLP weights split, the rest replicated) loads as the full tensors."""
    _, model = run
    full = checkpoint_state(model)
    split = {name for name in full if ".mlp." in name}
    root = tmp_path / "checkpoints"
    tmp = ckpt.partial_dir(root, 7)
    rank_files = {}
    for t in range(2):
        local = {k: (v.chunk(2, dim=0)[t] if k in split else v).contiguous() for k, v in full.items()}
        records = [[k, list(v.shape), {"kind": "shard", "dim": 0} if k in split else {"kind": "replicated"}]
                   for k, v in local.items()]
        rank_files |= ckpt.write_rank_files(tmp, tp_rank=t, pp_rank=0, dp_rank=0, model_state=local,
                                            param_records=records, optimizer_tensors=None, zero_state=None)
    ckpt.publish_sharded(root, 7, layout={"tp": 2, "pp": 1, "dp": 1}, trainer_state=trainer_state(model, 7),
                         rank_files=rank_files)
    source = load_model_source(tmp_path)
    assert source.kind == CHECKPOINT and source.sharded and source.step == 7
    assert_same(source.state_dict, full)


def test_damaged_weights_are_refused_with_the_checkpoint_and_file_named(run, tmp_path):
    import shutil

    root, _ = run
    step = tmp_path / "step_00000002"
    shutil.copytree(root / "checkpoints" / "step_00000002", step)
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64
    weights.write_bytes(bytes(data))
    with pytest.raises(ConvertError) as info:
        load_model_source(step)
    message = str(info.value)
    assert message.startswith(f"{step}: model.safetensors: sha256 ") and "\n" not in message


def test_paths_that_are_no_model_source_are_one_line_errors_naming_them(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "half" / "checkpoints" / "step_00000005").mkdir(parents=True)  # never finished
    (tmp_path / "half" / "config.json").write_text("{}")
    (tmp_path / "partial" / "step_00000001").mkdir(parents=True)
    (tmp_path / "partial" / "step_00000001" / "trainer.json").write_text("{}")
    cases = {"missing": (SourceNotFoundError, "no such file or directory"),
             "file.txt": (ConvertError, "is a file"),
             "empty": (SourceNotFoundError, "is not a megapmp checkpoint"),
             "half": (SourceNotFoundError, "holds no complete step_XXXXXXXX/ checkpoint"),
             "partial/step_00000001": (ConvertError, "no model.safetensors: not a complete checkpoint")}
    for name, (error, words) in cases.items():
        with pytest.raises(error) as info:
            load_model_source(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and words in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):  # the trainer reports a missing init_from as a user error
        load_model_source(tmp_path / "missing")


# ---------------------------------------------------------------- HF directories, against transformers


def hf_config(tied: bool):
    from transformers import Qwen2Config

    return Qwen2Config(**TINY, tie_word_embeddings=tied, pad_token_id=1, eos_token_id=0, num_labels=1)


def our_model(source) -> Qwen2RewardModel:
    model = Qwen2RewardModel(source.config)
    model.init_weights()
    state = dict(source.state_dict)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "score.weight"}
    model.tie_weights()
    return model.eval()


def forward(model: Qwen2RewardModel, input_ids: torch.Tensor) -> torch.Tensor:
    rows, width = input_ids.shape
    attn = AttentionInputs.for_padded_causal([width] * rows, width)
    with torch.no_grad():
        return model(input_ids, torch.arange(width).expand(rows, width), attn)


IDS = torch.tensor([[5, 17, 33, 2, 90, 0], [7, 7, 61, 44, 12, 0]])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_sequence_classifier_scores_like_transformers(tied, tmp_path):
    from transformers import Qwen2ForSequenceClassification

    torch.manual_seed(0)
    hf = Qwen2ForSequenceClassification(hf_config(tied)).eval()
    hf.save_pretrained(tmp_path / "rm")
    assert find_model_source(tmp_path / "rm") == (HF, tmp_path / "rm")
    source = load_model_source(tmp_path / "rm")
    assert (source.kind, source.path, source.step) == (HF, tmp_path / "rm", None)
    assert source.has_reward_head and source.config.tie_word_embeddings == tied
    # A sequence classifier carries no LM head: untied, the source says so rather than inventing zeros.
    assert source.has_lm_head == tied and "lm_head.weight" not in source.state_dict
    assert torch.equal(source.state_dict["score.weight"], hf.score.weight.detach())
    with torch.no_grad():
        expected = hf(input_ids=IDS).logits[:, 0]
    ours = our_model(source).rewards(forward(our_model(source), IDS))[:, -1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_causal_lm_has_no_reward_head_and_its_logits_match(tied, tmp_path):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_config(tied)).eval()
    hf.save_pretrained(tmp_path / "lm")
    source = load_model_source(tmp_path / "lm")
    assert source.kind == HF and not source.has_reward_head and source.has_lm_head
    assert "score.weight" not in source.state_dict
    with torch.no_grad():
        expected = hf(input_ids=IDS).logits
    model = our_model(source)
    torch.testing.assert_close(model.lm_head(forward(model, IDS)), expected, rtol=0, atol=1e-5)


def test_untied_export_takes_its_lm_head_from_the_sidecar_file(tmp_path):
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(hf_config(False)).eval()
    torch.manual_seed(1)
    rm = Qwen2ForSequenceClassification(hf_config(False))
    rm.model.load_state_dict(lm.model.state_dict())
    rm.save_pretrained(tmp_path / "rm")
    save_file({"lm_head.weight": lm.lm_head.weight.detach().contiguous()}, tmp_path / "rm" / "lm_head.safetensors")
    source = load_model_source(tmp_path / "rm")
    assert source.lm_head_file and source.has_lm_head and source.has_reward_head
    assert torch.equal(source.state_dict["lm_head.weight"], lm.lm_head.weight.detach())
    model = our_model(source)
    with torch.no_grad():
        expected = lm(input_ids=IDS).logits
    torch.testing.assert_close(model.lm_head(forward(model, IDS)), expected, rtol=0, atol=1e-5)


def test_foreign_hf_config_is_a_one_line_error_naming_the_directory(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(ConvertError, match=r"llama: ValueError: .*model_type='llama'") as info:
        load_model_source(tmp_path / "llama")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the trainer's init_from and the recipe


def test_init_from_a_causal_lm_keeps_the_models_own_reward_head(tmp_path):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_config(False))
    hf.save_pretrained(tmp_path / "lm")
    model = tiny_model(False, seed=3)
    own_score = model.score.weight.detach().clone()
    assert init_model_from(model, tmp_path / "lm", with_reward_head=True) == "HF directory (with reward head)"
    assert torch.equal(model.score.weight, own_score)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight.detach())
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight.detach())


def test_foreign_hf_recipe_uses_its_own_tokenizer_and_plain_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    Qwen2ForSequenceClassification(hf_config(True)).save_pretrained(tmp_path / "rm")
    vocab = {"<eos>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate("def f return x y + 1".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(tmp_path / "rm")
    recipe = scoring_recipe(load_model_source(tmp_path / "rm"))
    assert (recipe.template["text"], recipe.eos_policy, recipe.eos_id, recipe.pad_id) == ("{prompt}", "none", 0, 1)
    # The ids are AutoTokenizer's, as any HF stack scoring this directory would make them.
    hf = AutoTokenizer.from_pretrained(tmp_path / "rm")
    ids = [hf(text, add_special_tokens=False)["input_ids"] for text in ("def f", "return x + 1")]
    assert recipe.encode("def f", ["return x + 1"]) == (ids[0], [ids[1]]) and all(ids)
    with pytest.raises(ConvertError, match="a shard cannot be checked against it"):
        scoring_recipe(load_model_source(tmp_path / "rm"), shard=str(tmp_path / "nowhere"))
