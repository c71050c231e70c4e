"""tools/convert_checkpoint.py: megapmp checkpoints <-> HF Qwen2 directories, checked against transformers.

Models are trained here for a few steps on a generated pairs file (a trained ``bpe:300`` tokenizer, the
CodePMP prompt template and tied embeddings; the byte tokenizer, no template and an untied LM head),
exported, and scored by transformers from the export alone: ``AutoTokenizer`` +
``AutoModelForSequenceClassification`` + megapmp_scoring.json, no megapmp code on that side. Tolerance: fp32 on CPU, atol 1e-5 on scores; HF runs each sequence in a
right-padded batch, we pack several sequences into one row, so summation order differs (~1e-7).
Weight round trips are bitwise.
"""
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megapmp import checkpoint as ckpt
from megapmp.config import ModelConfig
from megapmp.convert.hf import from_hf_config
from megapmp.convert.hf_tokenizer import export_tokenizer
from megapmp.data.datasets import PairDataset
from megapmp.data.preprocess import build_shard
from megapmp.data.tokenizers import load_tokenizer
from megapmp.loss import score_pairs
from megapmp.model import Qwen2RewardModel
from tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_checkpoint.py"
ATOL = 1e-5


tool = load_tool("convert_checkpoint")


def generated_pairs(n: int, seed: int = 0) -> list[dict]:
    """Small code-preference pairs: a correct list comprehension vs a loop that does nothing."""
    rng = random.Random(seed)
    names = ["add", "scale", "clip", "mean", "count", "merge", "split", "parse", "größe", "naïve"]
    pairs = []
    for i in range(n):
        name, op, k = rng.choice(names), rng.choice(["+", "-", "*", "//", "%"]), rng.randint(1, 99)
        pairs.append({
            "prompt": f"Write a function {name}_{i} that applies {op} {k} to every item of a list (ünïcode ok).",
            "chosen": f"def {name}_{i}(xs):\n    return [x {op} {k} for x in xs]\n",
            "rejected": f"def {name}_{i}(xs):\n    for x in xs:\n        x {op}= {k}\n" + "    " * (i % 3),
        })
    return pairs


def train(directory: Path, tokenizer: str, tied: bool, template: str = "none",
          eos_policy: str | None = None) -> SimpleNamespace:
    from megapmp.train import main as train_main

    pairs = generated_pairs(32)
    jsonl = directory / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    prefix = directory / "data" / "pairs"
    build_shard([str(jsonl)], str(prefix), tokenizer=tokenizer, template=template, eos_policy=eos_policy,
                progress=False)
    run_dir = directory / "run"
    assert train_main(["--config", str(REPO / "examples/configs/tiny.toml"), "--run-dir", str(run_dir),
                       "--data.train", str(prefix), "--steps", "2", "--logging.progress", "false",
                       "--logging.eval_interval", "0", "--data.seq_len", "512", "--data.items_per_step", "4",
                       "--data.micro_batches", "1", "--model.tie_word_embeddings", str(tied).lower()]) == 0
    return SimpleNamespace(run_dir=run_dir, prefix=prefix, pairs=pairs, tied=tied, tokenizer=tokenizer,
                           checkpoint=ckpt.latest_checkpoint(run_dir / "checkpoints"))


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("bpe"), "bpe:300", tied=True, template="codepmp")


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    # The default policy (no EOS: the reward read at the response's last token) on the bpe run, EOS appended
    # (the reward read at the EOS) here: HF's pooling of the last non-pad token must find both.
    return train(tmp_path_factory.mktemp("byte"), "byte", tied=False, eos_policy="response")


@pytest.fixture(params=["bpe_run", "byte_run"], ids=["bpe300-tied-no-eos", "byte-untied-eos"])
def trained(request):
    return request.getfixturevalue(request.param)


def run(*args) -> int:
    return tool.main([str(a) for a in args])


def our_model(checkpoint: Path) -> Qwen2RewardModel:
    model_state, _, state = ckpt.load_checkpoint(checkpoint)
    model = Qwen2RewardModel(ModelConfig(**state["config"]["model"]))
    model.load_state_dict(model_state, strict=False)
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- 1. HF scores equal ours


def hf_score_texts(export: Path, pairs: list[dict]) -> tuple[list[list[int]], torch.Tensor]:
    """Input ids and scores of (prompt, chosen) and (prompt, rejected) for each pair, built by
    transformers and megapmp_scoring.json alone, as any HF scorer would."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scoring = json.loads((export / "megapmp_scoring.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export / scoring["tokenizer"]["path"])
    model, info = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    template = scoring["template"]["text"]
    eos = [scoring["eos_token_id"]] if scoring["eos_policy"] == "response" else []
    assert scoring["add_special_tokens"] is False

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = [encode(template.replace("{prompt}", p["prompt"])) + encode(p[key]) + eos
            for p in pairs for key in ("chosen", "rejected")]
    pad = scoring["pad_token_id"]
    input_ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):  # right padding: HF pools the last non-pad token
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    with torch.no_grad():
        scores = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    return rows, scores


def test_trained_model_scores_equal_in_transformers(trained, tmp_path):
    export = tmp_path / "hf"
    assert run("to-hf", "--input", trained.run_dir, "--output", export) == 0

    expected = {"config.json", "model.safetensors", "megapmp_scoring.json", "tokenizer"}
    if not trained.tied:
        expected.add("lm_head.safetensors")
    scoring = json.loads((export / "megapmp_scoring.json").read_text())
    if scoring["tokenizer"]["top_level"]:
        expected |= {"tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in export.iterdir()} == expected
    assert sorted(p.name for p in (export / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left behind

    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == scoring["pad_token_id"] != scoring["eos_token_id"] == config["eos_token_id"]
    meta = PairDataset(trained.prefix).meta
    assert (scoring["eos_token_id"], scoring["pad_token_id"]) == (meta.eos_id, meta.pad_id)
    assert scoring["template"]["text"] == meta.template["text"] and scoring["eos_policy"] == meta.eos_policy
    assert meta.eos_policy == ("none" if trained.tied else "response")
    assert ("### Code Description:" in scoring["template"]["text"]) == trained.tied  # the bpe run uses codepmp
    assert scoring["source"]["step"] == 2

    rows, hf_scores = hf_score_texts(export, trained.pairs)

    dataset = PairDataset(trained.prefix)
    pairs = [dataset[i] for i in range(len(dataset))]
    # The HF tokenizer reproduces the training tokens exactly.
    ours_rows = [np.concatenate([p.prompt, response]).tolist() for p in pairs for response in (p.chosen, p.rejected)]
    assert rows == ours_rows
    r_c, r_r = score_pairs(our_model(trained.checkpoint), pairs, seq_len=512, layout="duplicated",
                           pad_id=meta.pad_id, device="cpu")
    ours = torch.from_numpy(np.stack([r_c, r_r], axis=1).reshape(-1)).float()
    torch.testing.assert_close(hf_scores, ours, rtol=0, atol=ATOL)
    assert hf_scores.std() > 1e-3  # different texts really score differently

    if trained.tied:  # verify, the tool's own comparison, agrees (once is enough)
        pairs_file = trained.run_dir.parent / "pairs.jsonl"
        assert run("verify", "--checkpoint", trained.run_dir, "--hf", export, "--pairs", pairs_file, "--limit", 3) == 0
        # the candidate-set tasks score the export through transformers alone as through our model
        evaluate = load_tool("evaluate")
        fixtures = Path(__file__).parent / "fixtures" / "data"
        for task, data in (("best-of-n", fixtures / "gsm8k" / "example_model_solutions.jsonl"),
                           ("multiple-choice", fixtures / "logiqa2" / "test.txt")):
            scores = {}
            for backend, model in (("megapmp", trained.run_dir), ("transformers", export)):
                out = tmp_path / f"{task}_{backend}"
                assert evaluate.main([task, "--backend", backend, "--model", str(model), "--data", str(data),
                                      "--limit", "4", "--output", str(out) + ".json", "--save-scores",
                                      str(out) + ".jsonl", "--no-progress"]) == 0
                scores[backend] = [json.loads(line)["scores"] for line in open(str(out) + ".jsonl")]
            np.testing.assert_allclose(np.concatenate(scores["transformers"]), np.concatenate(scores["megapmp"]),
                                       rtol=0, atol=ATOL)


# ---------------------------------------------------------------- 2. round trips


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_to_hf_from_hf_round_trip_is_bitwise(trained, tmp_path):
    from safetensors.torch import load_file

    from megapmp.train import load_initial_weights

    original = load_file(trained.checkpoint / "model.safetensors")
    assert ("lm_head.weight" in original) != trained.tied
    variants = [[]] if trained.tied else [[], ["--with-lm-head"]]
    for extra in variants:
        export, imported = tmp_path / f"hf{len(extra)}", tmp_path / f"ckpt{len(extra)}"
        assert run("to-hf", "--input", trained.checkpoint, "--output", export, *extra) == 0
        assert (export / "lm_head.safetensors").exists() == (not trained.tied and not extra)
        assert run("from-hf", "--input", export, "--output", imported) == 0
        assert_same_tensors(load_file(imported / "model.safetensors"), original)
        state = json.loads((imported / "trainer.json").read_text())
        assert state["has_reward_head"] and state["has_lm_head"]
        assert ModelConfig(**state["config"]["model"]) == our_model(trained.checkpoint).config

        # Both the imported checkpoint and the HF directory itself initialise the trainer's model exactly.
        reference = our_model(trained.checkpoint).state_dict()
        for source in (imported, export):  # an untied export's LM head is read from lm_head.safetensors
            model = Qwen2RewardModel(our_model(trained.checkpoint).config)
            assert "with reward head" in load_initial_weights(model, str(source), with_reward_head=True)
            assert_same_tensors(model.state_dict(), reference)

    # An imported checkpoint exports again, with the tokenizer and scoring record it was imported with.
    again = tmp_path / "again"
    assert run("to-hf", "--input", imported, "--output", again, *extra) == 0
    assert_same_tensors(load_file(again / "model.safetensors"), load_file(export / "model.safetensors"))
    for name in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (again / name).read_bytes() == (export / name).read_bytes()


def test_from_hf_causal_lm_has_no_reward_head_and_trainer_starts_a_fresh_one(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megapmp.train import load_initial_weights

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      pad_token_id=1, eos_token_id=0))
    hf.save_pretrained(tmp_path / "lm")
    assert run("from-hf", "--input", tmp_path / "lm", "--output", tmp_path / "ckpt") == 0
    state = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    assert not state["has_reward_head"] and state["has_lm_head"]
    assert state["imported_from"]["architectures"] == ["Qwen2ForCausalLM"]
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "score.weight" not in weights
    assert torch.equal(weights["lm_head.weight"], hf.lm_head.weight.detach())

    model = Qwen2RewardModel(ModelConfig(**state["config"]["model"]))
    torch.manual_seed(1)
    model.init_weights()
    fresh_score = model.score.weight.detach().clone()
    assert "fresh reward head" in load_initial_weights(model, str(tmp_path / "ckpt"), with_reward_head=False)
    assert torch.equal(model.score.weight, fresh_score)
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight.detach())
    # An LM without a reward head is no reward model: exporting it is refused.
    assert run("to-hf", "--input", tmp_path / "ckpt", "--output", tmp_path / "out") == 1
    assert "no reward head" in capsys.readouterr().err


def test_init_from_an_untied_hf_dir_without_lm_head_keeps_the_fresh_head(tmp_path):
    """An untied sequence classifier exported without its LM head (and no lm_head.safetensors beside
    it): the trainer keeps its own initial LM head rather than the zeros the importer fills in."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from megapmp.train import load_initial_weights

    torch.manual_seed(0)
    hf = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, num_labels=1))
    hf.save_pretrained(tmp_path / "rm")
    config = from_hf_config(json.loads((tmp_path / "rm" / "config.json").read_text()))
    model = Qwen2RewardModel(config)
    model.init_weights()
    fresh_head = model.lm_head.weight.detach().clone()
    origin = load_initial_weights(model, str(tmp_path / "rm"), with_reward_head=True)
    assert "fresh LM head" in origin and "with reward head" in origin
    assert torch.equal(model.lm_head.weight, fresh_head) and fresh_head.abs().sum() > 0
    assert torch.equal(model.score.weight, hf.score.weight.detach())


def _foreign_hf_reward_model(directory: Path, tokenizer_file: Path | None):
    """A tiny random Qwen2ForSequenceClassification saved by transformers (tied, eos 0, pad 1), with the
    given tokenizer.json saved beside it by transformers too, or none."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    hf = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=1, eos_token_id=0, num_labels=1))
    with torch.no_grad():
        hf.score.weight.normal_(0, 1.0)  # scores spread enough to tell texts apart
    hf.save_pretrained(directory)
    if tokenizer_file is not None:
        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>",
                                pad_token="<|pad|>").save_pretrained(directory)
    return directory


def _hf_scores(directory: Path, rows: list[list[int]]) -> torch.Tensor:
    """transformers' scores of right-padded id rows (pad 1), as any HF scorer computes them."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.full((len(rows), max(map(len, rows))), 1, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits[:, 0]


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["with-tokenizer", "without-tokenizer"])
def test_import_then_export_a_foreign_hf_model(with_tokenizer, tmp_path, capsys):
    """from-hf, then to-hf: the weights come back bitwise and transformers scores the export exactly like the
    original; with the tokenizer the HF directory brought, or (without one) the weights only, saying so, or
    with --tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from megapmp.eval.reward_model import RewardScorer

    # Built the Qwen2 way (as a foreign Qwen2 model's is): transformers >= 5 rebuilds any tokenizer of a qwen2
    # directory as Qwen2Tokenizer, which gives its own ids only for those.
    tokenizer_file = _bpe_file(tmp_path / "tok", ["<|endoftext|>", "<|pad|>"], qwen_pipeline=True)
    original = _foreign_hf_reward_model(tmp_path / "hf", tokenizer_file if with_tokenizer else None)
    assert run("from-hf", "--input", original, "--output", tmp_path / "ckpt") == 0
    capsys.readouterr()
    assert run("to-hf", "--input", tmp_path / "ckpt", "--output", tmp_path / "out") == 0
    err = capsys.readouterr().err
    out = tmp_path / "out"

    assert_same_tensors(load_file(out / "model.safetensors"), load_file(original / "model.safetensors"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    rows = [tok(text, add_special_tokens=False)["input_ids"] for text in SAMPLES[:-1]]
    theirs = _hf_scores(original, rows)
    assert torch.equal(_hf_scores(out, rows), theirs) and theirs.std() > 1e-3

    if with_tokenizer:
        assert "warning" not in err
        scoring = json.loads((out / "megapmp_scoring.json").read_text())
        assert (scoring["eos_policy"], scoring["template"]["text"]) == ("none", "{prompt}")
        assert (scoring["eos_token_id"], scoring["pad_token_id"]) == (0, 1)
        exported = AutoTokenizer.from_pretrained(out / scoring["tokenizer"]["path"])
        assert [exported(t, add_special_tokens=False)["input_ids"] for t in SAMPLES[:-1]] == rows
        # megapmp scores the original, the imported checkpoint and the export alike, bit for bit.
        prompts, responses = ["Add one.", "Sort xs."], ["return x + 1", "sorted(xs)"]
        scores = [RewardScorer.load(path, progress=False).score(prompts, responses)
                  for path in (original, tmp_path / "ckpt", out)]
        assert all((s == scores[0]).all() for s in scores)
    else:
        assert "imported from an HF directory without a tokenizer: exported the weights and config only" in err
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        # ... or with one named on the command line.
        assert run("to-hf", "--input", tmp_path / "ckpt", "--output", tmp_path / "named", "--tokenizer",
                   tokenizer_file) == 0
        assert_same_tensors(load_file(tmp_path / "named" / "model.safetensors"),
                            load_file(original / "model.safetensors"))
        assert (tmp_path / "named" / "tokenizer" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- tokenizers as HF fast tokenizers

SAMPLES = ["héllo wörld ✓ 中文 🙂", "def f(x):\n    return x + 1  # ok\n", "  two  spaces\tand\r\n", "1234567 + 89",
           "cafe\u0301 (not NFC)", ""]


def _bpe_file(directory: Path, specials: list[str], qwen_pipeline: bool) -> Path:
    """A small byte-level BPE tokenizer.json: GPT-2 pre-tokenization, or Qwen2's (NFC + its split regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen_pipeline:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"{p['prompt']}\n{p['chosen']}\n{p['rejected']}" for p in generated_pairs(40, seed=1)] + SAMPLES
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def _tiktoken_file(directory: Path) -> Path:
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    for word in (b"de", b"def", b" r", b"re", b"ret", b"return", b"  ", b"    ", b"in", b"for", b" x", b"12"):
        ranks.setdefault(word, len(ranks))  # a whole pre-token in the ranks is one token, in tiktoken and in HF
    directory.mkdir(parents=True)
    path = directory / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in ranks.items()))
    return path


def _export_dir(path: Path, tokenizer) -> Path:
    from megapmp.convert.hf import to_hf_config

    config = ModelConfig(vocab_size=512)
    path.mkdir()
    hf_config = to_hf_config(config, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    (path / "config.json").write_text(json.dumps(hf_config))
    return path


@pytest.mark.parametrize("kind", ["qwen2-pipeline", "gpt2-pipeline-added-pad", "tiktoken", "sentencepiece"])
def test_tokenizer_export_gives_our_ids_in_transformers(kind, tmp_path):
    from transformers import AutoTokenizer

    if kind == "tiktoken":
        tokenizer = load_tokenizer(f"tiktoken:{_tiktoken_file(tmp_path / 'src')}")
    elif kind == "sentencepiece":
        spm = pytest.importorskip("sentencepiece")
        import io

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(SAMPLES * 20 + [p["chosen"] for p in generated_pairs(40)]),
                                       model_writer=model, vocab_size=320, model_type="bpe", byte_fallback=True,
                                       hard_vocab_limit=False, minloglevel=2)
        (tmp_path / "sp.model").write_bytes(model.getvalue())
        tokenizer = load_tokenizer(f"sp:{tmp_path / 'sp.model'}")
    else:
        qwen = kind == "qwen2-pipeline"
        specials = ["<|endoftext|>", "<|pad|>"] if qwen else ["<|endoftext|>"]
        tokenizer = load_tokenizer(f"hf:{_bpe_file(tmp_path / 'src', specials, qwen)}")
        assert tokenizer.added_tokens == (() if qwen else ("<|pad|>",))

    export = _export_dir(tmp_path / "export", tokenizer)
    info = export_tokenizer(tokenizer, export)
    if kind == "sentencepiece":  # no faithful HF fast form: the model file is kept, and said so
        assert not info["hf_tokenizer"] and info["note"] and info["path"] == "tokenizer"
        assert (export / "tokenizer" / "sp.model").read_bytes() == (tmp_path / "sp.model").read_bytes()
        return
    # Only a tokenizer built the Qwen2 way survives transformers' Qwen2Tokenizer at the top level.
    assert info["top_level"] == (kind == "qwen2-pipeline") and (export / "tokenizer.json").exists() == info["top_level"]
    places = [export / "tokenizer"] + ([export] if info["top_level"] else [])
    for place in places:
        hf = AutoTokenizer.from_pretrained(place)
        assert (hf.eos_token_id, hf.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
        for text in SAMPLES + ["<|endoftext|> inside text", "x<|pad|>y"]:
            if kind == "gpt2-pipeline-added-pad" and "<|pad|>" in text:
                continue  # ours does not know the appended pad in raw text; HF matches it (documented)
            assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), (place, text)


# ---------------------------------------------------------------- 3. refusals


def test_refuses_inputs_that_are_not_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text("{}")
    (tmp_path / "half" / "checkpoints" / "step_00000005").mkdir(parents=True)  # a save that never finished
    cases = {"missing": "no such file", "empty": "not a megapmp checkpoint", "file.txt": "is a file",
             "hfdir": "use from-hf", "half": "not a megapmp checkpoint"}
    for name, message in cases.items():
        assert run("to-hf", "--input", tmp_path / name, "--output", tmp_path / "out") == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert run("from-hf", "--input", tmp_path / "empty", "--output", tmp_path / "out") == 1
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "hfdir" / "config.json").write_text('{"model_type": "llama", "vocab_size": 8}')
    assert run("from-hf", "--input", tmp_path / "hfdir", "--output", tmp_path / "out") == 1
    assert "model_type='llama'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_without_the_flag(bpe_run, tmp_path, capsys):
    trained = bpe_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("to-hf", "--input", trained.run_dir, "--output", out) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # Replacing the input itself is refused even with --overwrite.
    assert run("to-hf", "--input", trained.checkpoint, "--output", trained.run_dir, "--overwrite") == 1
    assert "would replace its own input" in capsys.readouterr().err
    assert trained.checkpoint.is_dir()

    assert run("to-hf", "--input", trained.run_dir, "--output", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert run("from-hf", "--input", out, "--output", out) == 1
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    assert run("from-hf", "--input", out, "--output", ckpt_dir) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert run("from-hf", "--input", out, "--output", ckpt_dir, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_moved_training_shards_are_found_with_shard_and_checked(bpe_run, tmp_path, capsys):
    import shutil

    trained = bpe_run

    moved = tmp_path / "step"
    shutil.copytree(trained.checkpoint, moved)
    state = json.loads((moved / "trainer.json").read_text())
    state["config"]["data"]["train"] = ["gone/pairs"]
    (moved / "trainer.json").write_text(json.dumps(state))
    assert run("to-hf", "--input", moved, "--output", tmp_path / "a") == 1
    assert "pass --shard PREFIX or --tokenizer DIR" in capsys.readouterr().err

    other = tmp_path / "byte"
    build_shard([str(trained.run_dir.parent / "pairs.jsonl")], str(other), tokenizer="byte", progress=False)
    assert run("to-hf", "--input", moved, "--output", tmp_path / "a", "--shard", other) == 1
    assert "was not made like this checkpoint's training data" in capsys.readouterr().err
    assert run("to-hf", "--input", moved, "--output", tmp_path / "a", "--tokenizer", "byte") == 1
    assert "not the one the data was made with" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    assert run("to-hf", "--input", moved, "--output", tmp_path / "a", "--shard", trained.prefix) == 0
    assert run("to-hf", "--input", moved, "--output", tmp_path / "b", "--tokenizer", f"{trained.prefix}.tokenizer") == 0
    for name in ("model.safetensors", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_verify_reads_pairs_by_preprocessings_rules(bpe_run, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"}) + "\n")
    assert run("verify", "--checkpoint", bpe_run.run_dir, "--hf", tmp_path / "hf", "--pairs", pairs) == 1
    assert f"error: {pairs}:1 field 'prompt': empty field" in capsys.readouterr().err


def test_cli_help_and_exit_codes():
    def cli(*args):
        return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=60)

    for command, flags in {"to-hf": ["--input", "--output", "--dtype", "--with-lm-head", "--overwrite", "--shard",
                                     "--tokenizer"],
                           "from-hf": ["--input", "--output", "--overwrite"],
                           "verify": ["--checkpoint", "--hf", "--pairs", "--limit", "--atol"]}.items():
        proc = cli(command, "--help")
        assert proc.returncode == 0
        assert all(flag in proc.stdout for flag in flags), proc.stdout
    proc = cli("to-hf", "--input", "/nonexistent/run", "--output", "/tmp/never")
    assert proc.returncode == 1 and "error: /nonexistent/run: no such file" in proc.stderr
    assert cli("to-hf").returncode == 2  # usage
