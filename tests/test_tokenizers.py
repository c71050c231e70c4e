"""Tokenizer families built from local text (no downloads): byte, HF BPE, SentencePiece, tiktoken."""

import base64
import collections
import hashlib
import inspect
import io
import json
import json.decoder
import json.encoder
import os
import pickle
import string
import subprocess
import sys
import textwrap

import pytest

from megapmp.data.tokenizers import (
    CL100K_PATTERN,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    padded_vocab_size,
    train_bpe,
)

SAMPLES = [
    "héllo wörld ✓ 中文",
    "def f(x):\n    return x + 1  # ok\n",
    "  two leading spaces, tabs\tand trailing  ",
    "emoji 🙂 and math ∑ᵢ xᵢ²",
    "",
]


def _corpus_lines():
    lines = []
    for module in (json.decoder, json.encoder, textwrap, string):
        lines += [line for line in inspect.getsource(module).splitlines() if line.strip()]
    return lines


@pytest.fixture(scope="module")
def corpus():
    lines = _corpus_lines()
    assert len(lines) > 300
    return lines


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus):
    directory = tmp_path_factory.mktemp("hf")
    train_bpe(corpus, 400, directory)
    return directory


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory, corpus):
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    model = io.BytesIO()
    # byte_fallback + identity normalization + kept whitespace make the model lossless on any text.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def _train_tiktoken_ranks(text, merges):
    """Plain greedy byte-pair merging over cl100k pre-tokens; ties broken by the pair's bytes."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in word.encode("utf-8")] for word in regex.findall(CL100K_PATTERN, text)]
    for _ in range(merges):
        counts = collections.Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        (left, right), _ = max(counts.items(), key=lambda item: (item[1], item[0]))
        ranks[left + right] = len(ranks)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == left and word[i + 1] == right:
                    word[i : i + 2] = [left + right]
                i += 1
    return ranks


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory, corpus):
    ranks = _train_tiktoken_ranks("\n".join(corpus[:300]), merges=60)
    assert len(ranks) == 316
    path = tmp_path_factory.mktemp("tiktoken") / "tiny.tiktoken"
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in ranks.items()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(params=["byte", "hf", "sp", "tiktoken"])
def tok(request) -> Tokenizer:
    spec = {
        "byte": lambda: "byte",
        "hf": lambda: f"hf:{request.getfixturevalue('hf_dir')}",
        "sp": lambda: f"sp:{request.getfixturevalue('sp_path')}",
        "tiktoken": lambda: f"tiktoken:{request.getfixturevalue('tiktoken_path')}",
    }[request.param]()
    return load_tokenizer(spec)


# ---- every family ---------------------------------------------------------------------------------


def test_round_trip_and_ids_in_range(tok):
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Something non-trivial actually happened: multi-byte text needs more than zero tokens.
    assert len(tok.encode(SAMPLES[0])) > 5


def test_special_ids(tok):
    assert tok.eos_id != tok.pad_id
    assert 0 <= tok.eos_id < tok.vocab_size and 0 <= tok.pad_id < tok.vocab_size
    assert tok.encode("") == []
    # No eos/pad is ever added, and decode drops them.
    ids = tok.encode("ab cd")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "ab cd"


def test_encode_batch_equals_encode(tok, corpus):
    texts = SAMPLES + corpus[:50]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_spec_reload_is_equal(tok):
    spec = tok.spec()
    if tok.family != "byte":
        assert os.path.isabs(spec.split(":", 1)[1])
    again = load_tokenizer(spec)
    assert type(again) is type(tok) and again == tok
    assert again.identity() == tok.identity()
    assert again.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)


def test_save_reload_is_equal(tok, tmp_path):
    spec = tok.save(tmp_path / "copy")
    again = load_tokenizer(spec)
    assert again == tok
    assert again.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    if tok.family != "byte":
        assert spec.split(":", 1)[1].startswith(str(tmp_path / "copy"))
        assert load_tokenizer(str(tmp_path / "copy")) == tok  # the bare directory is a spec too
        assert again.spec() != tok.spec()
        assert again.file_sha256() == tok.file_sha256()


def test_identity_is_json_and_hashes_the_files(tok):
    identity = json.loads(json.dumps(tok.identity()))
    assert identity["family"] == tok.family
    assert identity["spec"] == tok.spec()
    assert (identity["vocab_size"], identity["eos_id"], identity["pad_id"]) == (tok.vocab_size, tok.eos_id, tok.pad_id)
    assert (identity["eos_token"], identity["pad_token"]) == (tok.eos_token, tok.pad_token)
    if tok.family == "byte":
        assert identity["sha256"] is None
    else:
        directory = os.path.dirname(tok.spec().split(":", 1)[1])
        assert identity["sha256"]
        for name, digest in identity["sha256"].items():
            with open(os.path.join(directory, name), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest


def test_pickles_as_its_spec(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again == tok and again.spec() == tok.spec()
    assert again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])


# ---- byte -----------------------------------------------------------------------------------------


def test_byte_tokenizer_layout():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok == load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")
    with pytest.raises(ValueError):
        tok.decode([300])


# ---- HF -------------------------------------------------------------------------------------------


def test_hf_matches_library_and_transformers(hf_dir, monkeypatch):
    from tokenizers import Tokenizer as RustTokenizer

    tok = load_tokenizer(str(hf_dir))  # bare directory spec
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (400, 0, 1)
    assert tok.added_tokens == ()
    rust = RustTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in SAMPLES:
        assert tok.encode(text) == rust.encode(text, add_special_tokens=False).ids

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def _write_hf(directory, special_tokens, config=None):
    """A tiny word-level tokenizer.json whose special tokens follow the 4 words, in the given order."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    rust = RustTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "code": 3}, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.add_special_tokens(list(special_tokens))
    rust.save(os.path.join(directory, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(directory)


def test_hf_pad_equal_to_eos_in_config_is_replaced(hf_dir, tmp_path):
    directory = tmp_path / "bpe"
    load_tokenizer(f"hf:{hf_dir}").save(directory)
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # what HF base models ship
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(directory / "tokenizer.json"))
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 400)


def test_hf_qwen2_base_like_uses_fim_pad(tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]  # ids 4..7
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok = load_tokenizer(_write_hf(tmp_path, specials, config))
    assert (tok.eos_token, tok.eos_id) == ("<|endoftext|>", 4)
    assert (tok.pad_token, tok.pad_id) == ("<|fim_pad|>", 7)
    assert tok.vocab_size == 8 and tok.added_tokens == ()


def test_hf_qwen2_instruct_like_config_with_added_token_dicts(tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = {"eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>"}
    tok = load_tokenizer(_write_hf(tmp_path, specials, config))
    assert (tok.eos_token, tok.eos_id) == ("<|im_end|>", 6)
    assert (tok.pad_token, tok.pad_id) == ("<|endoftext|>", 4)


def test_hf_without_pad_token_appends_one(tmp_path):
    # <|im_end|> is not taken as pad: it can occur inside chat-formatted text.
    tok = load_tokenizer(_write_hf(tmp_path, ["</s>", "<|im_end|>"]))
    assert (tok.eos_token, tok.eos_id) == ("<|im_end|>", 5)  # no config: candidate order, not id order
    assert (tok.pad_token, tok.pad_id, tok.vocab_size) == ("<|pad|>", 6, 7)
    assert tok.identity()["added_tokens"] == ["<|pad|>"]
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([1, 2, tok.pad_id, tok.pad_id]) == "hello world"
    assert load_tokenizer(tok.save(tmp_path / "copy")) == tok


def test_hf_without_eos_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no eos token"):
        load_tokenizer(_write_hf(tmp_path, ["<s>"]))


# ---- SentencePiece --------------------------------------------------------------------------------


def test_sentencepiece_matches_library_and_appends_pad(sp_path):
    import sentencepiece as spm

    tok = load_tokenizer(str(sp_path))  # bare *.model spec
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    for text in SAMPLES:
        assert tok.encode(text) == sp.encode(text)
    assert sp.pad_id() == -1  # the trainer's default: no pad piece
    assert (tok.eos_id, tok.eos_token) == (sp.eos_id(), "</s>")
    assert (tok.pad_id, tok.vocab_size) == (400, 401)
    assert tok.added_tokens == ("<|pad|>",)
    assert tok.pad_id != sp.unk_id()


def test_sentencepiece_uses_its_own_pad(tmp_path, corpus):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, pad_id=3, byte_fallback=True, minloglevel=2
    )
    (tmp_path / "pad.model").write_bytes(model.getvalue())
    tok = load_tokenizer(f"sp:{tmp_path / 'pad.model'}")
    assert (tok.eos_id, tok.pad_id, tok.pad_token, tok.vocab_size) == (2, 3, "<pad>", 400)
    assert tok.added_tokens == ()


# ---- tiktoken -------------------------------------------------------------------------------------


def test_tiktoken_matches_library(tiktoken_path, monkeypatch):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # keep tiktoken from caching the test file in /tmp
    ranks = load_tiktoken_bpe(str(tiktoken_path))
    enc = tiktoken.Encoding("reference", pat_str=CL100K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tok = load_tokenizer(str(tiktoken_path))  # bare *.tiktoken spec
    assert isinstance(tok, TiktokenTokenizer)
    for text in SAMPLES + ["    return self.decode(s)"]:
        assert tok.encode(text) == enc.encode_ordinary(text)
    assert any(i >= 256 for i in tok.encode("    return self.decode(s)"))  # merges are used
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (316, 317, 318)
    # Special-token text in data is plain text.
    assert tok.eos_id not in tok.encode("<|endoftext|>")


def test_tiktoken_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(base64.b64encode(b"a") + b" 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2"):
        load_tokenizer(str(path))


# ---- specs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["x", "", "gpt2", "foo:bar", "tokenizer_config.json"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer(spec)


def test_bpe_spec_points_to_train_bpe():
    with pytest.raises(ValueError, match="train_bpe"):
        load_tokenizer("bpe:32000")


@pytest.mark.parametrize("spec", ["hf:", "sp:", "tiktoken:"])
def test_prefix_without_path(spec):
    with pytest.raises(ValueError, match="names no path"):
        load_tokenizer(spec)


@pytest.mark.parametrize(
    "spec, missing",
    [
        ("hf:{tmp}/nope/tokenizer.json", "{tmp}/nope/tokenizer.json"),
        ("hf:{tmp}", "{tmp}/tokenizer.json"),
        ("{tmp}", "{tmp}/tokenizer.json"),
        ("{tmp}/tokenizer.json", "{tmp}/tokenizer.json"),
        ("sp:{tmp}/a.model", "{tmp}/a.model"),
        ("{tmp}/a.model", "{tmp}/a.model"),
        ("tiktoken:{tmp}/a.tiktoken", "{tmp}/a.tiktoken"),
        ("{tmp}/a.tiktoken", "{tmp}/a.tiktoken"),
    ],
)
def test_missing_file_names_the_path(tmp_path, spec, missing):
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(spec.format(tmp=tmp_path))
    assert error.value.filename == missing.format(tmp=tmp_path)
    assert missing.format(tmp=tmp_path) in str(error.value)


def test_bare_paths_pick_the_family(hf_dir, sp_path, tiktoken_path):
    assert load_tokenizer(str(hf_dir)).spec() == f"hf:{hf_dir / 'tokenizer.json'}"
    assert load_tokenizer(str(hf_dir / "tokenizer.json")).family == "hf"
    assert load_tokenizer(str(sp_path)).spec() == f"sp:{sp_path}"
    assert load_tokenizer(str(tiktoken_path)).spec() == f"tiktoken:{tiktoken_path}"


def test_directory_with_two_models_is_ambiguous(sp_path, tmp_path):
    for name in ("a.model", "b.model"):
        (tmp_path / name).write_bytes(sp_path.read_bytes())
    with pytest.raises(ValueError, match="several .model files"):
        load_tokenizer(str(tmp_path))


def test_equality_compares_content(hf_dir, tmp_path, corpus):
    assert len({load_tokenizer("byte"), load_tokenizer(None)}) == 1
    assert load_tokenizer(f"hf:{hf_dir}") != load_tokenizer("byte")
    # Same special ids and vocab size, different merges: the file hash tells them apart.
    other = train_bpe(corpus[::-1][:200], 400, tmp_path)
    assert (other.vocab_size, other.eos_id, other.pad_id) == (400, 0, 1)
    assert other != load_tokenizer(f"hf:{hf_dir}")


# ---- train_bpe ------------------------------------------------------------------------------------


def test_train_bpe_is_deterministic(tmp_path, corpus):
    first = train_bpe(corpus, 350, tmp_path / "a")
    second = train_bpe(iter(corpus), 350, tmp_path / "b")  # a one-shot iterator works too
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first == second and first.vocab_size == 350
    assert first.encode_batch(SAMPLES) == second.encode_batch(SAMPLES)
    # Another process (other hash seeds, other thread timing) trains the very same file.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_tokenizers as t; "
        "t.train_bpe(t._corpus_lines(), 350, sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path / "c")], check=True)
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"]) == ("<|endoftext|>", "<|pad|>")


def test_train_bpe_rejects_too_small_vocab(tmp_path, corpus):
    with pytest.raises(ValueError, match="vocab_size 200"):
        train_bpe(corpus, 200, tmp_path)


# ---- padded_vocab_size ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab, multiple, tp, expected",
    [
        (258, 128, 1, 384),
        (256, 128, 1, 256),
        (257, 128, 1, 384),
        (151665, 128, 1, 151680),
        (151665, 128, 2, 151808),
        (50257, 128, 8, 51200),
        (400, 1, 1, 400),
    ],
)
def test_padded_vocab_size(vocab, multiple, tp, expected):
    assert padded_vocab_size(vocab, multiple, tensor_parallel=tp) == expected


@pytest.mark.parametrize("args", [(0,), (258, 0), (258, 128, 0), (258.0,), (True,)])
def test_padded_vocab_size_rejects_bad_values(args):
    with pytest.raises(ValueError):
        padded_vocab_size(*args)
