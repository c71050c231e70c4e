"""A megapmp tokenizer as an HF fast tokenizer that gives the same ids, and where an export puts it.

byte: a byte-level BPE without merges whose ids are the byte values; tiktoken: the ranks as a byte-level BPE
with cl100k pre-tokenization; hf: its own files with any appended token (an added ``<|pad|>``). A
SentencePiece model has no faithful HF fast form here and is copied as is. Every export is checked on
TOKENIZER_CHECK_TEXTS with `tokenizers` and, where installed, with transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from megapmp.convert.source import TOKENIZER_SUBDIR, ConvertError
from megapmp.data.tokenizers import CL100K_PATTERN, parse_tiktoken_ranks

# Texts the exported tokenizer must encode exactly as ours before an export is written.
TOKENIZER_CHECK_TEXTS = (
    "def f(x):\n    return x + 1  # ok\n",
    "  two leading spaces, tabs\tand trailing  \r\n\n",
    "héllo wörld ✓ 中文 emoji 🙂 and math ∑ᵢ xᵢ²",
    "Write a function that parses JSON; raise ValueError on error. It's 42, isn't it?",
    "class A:\n\tpass\n\n\n    x = [i ** 2 for i in range(10)]  \n",
    "x = 1234567 + 89; y = 3.14159",
    "cafe\u0301 and re\u0301sume\u0301 (combining accents, not NFC)",
    "text that names <|endoftext|> in the middle",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of ByteLevel tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str | None):
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    tok = Tokenizer(model)
    if hasattr(tok.model, "ignore_merges"):
        tok.model.ignore_merges = True  # a whole pre-token in the vocabulary is one token, as tiktoken does
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_specials(tok, tokens: list[tuple[str, int]]) -> None:
    for content, wanted in tokens:
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        got = tok.token_to_id(content)
        if got != wanted:
            raise ConvertError(f"the HF tokenizer gives {content!r} id {got}, ours is {wanted}")


def hf_tokenizer_files(tokenizer) -> tuple[dict[str, bytes], dict]:
    """(file name -> contents, info) of an HF fast tokenizer that gives ``tokenizer``'s ids.

    byte: a byte-level BPE without merges whose ids are the byte values; tiktoken: the ranks as a
    byte-level BPE with cl100k pre-tokenization; hf: its own files, with any appended token (an added
    ``<|pad|>``) added. These three encode special-token text in data the way ours do (byte and
    tiktoken as plain text, via split_special_tokens). A SentencePiece model has no faithful HF fast
    form here: its file is copied and info["hf_tokenizer"] is False.
    """
    family = tokenizer.family
    info = {"family": family, "hf_tokenizer": True, "split_special_tokens": False, "note": None}
    config = {}
    if family == "byte":
        alphabet = bytes_to_unicode()
        tok = _byte_level_bpe({alphabet[b]: b for b in range(256)}, [], pattern=None)
        _add_specials(tok, [(tokenizer.eos_token, tokenizer.eos_id), (tokenizer.pad_token, tokenizer.pad_id)])
        info["split_special_tokens"] = True
    elif family == "tiktoken":
        tok = _tiktoken_as_hf(tokenizer)
        info["split_special_tokens"] = True
    elif family == "hf":
        tok, config = _hf_with_added_tokens(tokenizer)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        info.update(hf_tokenizer=False, note=(
            f"no HF fast tokenizer is written for the {family} family (no conversion known to give the same "
            f"ids); its file is copied as is. Tokenize with megapmp's tokenizer (megapmp.data.tokenizers."
            f"load_tokenizer on this directory's {', '.join(sorted(files))})."))
        return files, info

    tok.no_truncation()
    tok.no_padding()
    config.update({
        # The generic fast class loads tokenizer.json as is; model-specific classes may rebuild it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": info["split_special_tokens"],
    })
    config.setdefault("bos_token", None)
    config.setdefault("unk_token", None)
    files = {"tokenizer.json": tok.to_str().encode("utf-8"),
             "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}
    check_hf_tokenizer(files, info, tokenizer)
    return files, info


def _tiktoken_as_hf(tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tokenizer.save(tmp).partition(":")[2])
        ranks = parse_tiktoken_ranks(path.read_bytes(), str(path))
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; a merge for every
    # split of every token, prioritised by the merged token's rank, makes HF's BPE do the same.
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    tok = _byte_level_bpe({text(t): r for t, r in ranks.items()}, [(text(l), text(r)) for *_, l, r in merges],
                          pattern=CL100K_PATTERN)
    _add_specials(tok, [(tokenizer.eos_token, tokenizer.eos_id), (tokenizer.pad_token, tokenizer.pad_id)])
    return tok


def _hf_with_added_tokens(tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tokenizer.save(tmp).partition(":")[2])
        tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    # The appended tokens (an added <|pad|>) take the ids after the file's vocabulary, in order.
    first = tokenizer.vocab_size - len(tokenizer.added_tokens)
    _add_specials(tok, [(content, first + i) for i, content in enumerate(tokenizer.added_tokens)])
    return tok, config


def export_tokenizer(tokenizer, directory: Path) -> dict:
    """Write the tokenizer into ``directory/tokenizer/`` and, where that loads exactly, also at the top.

    transformers >= 5 loads the tokenizer of a directory whose config.json says qwen2 as Qwen2Tokenizer,
    which keeps tokenizer.json's vocabulary and merges but rebuilds the normalizer (NFC) and the
    pre-tokenizer as Qwen2's: exact for Qwen2's own tokenizer, not for tokenizers built otherwise. The
    subdirectory has no config.json, so AutoTokenizer loads it as written, in every version. The top
    level gets the files only when AutoTokenizer, as installed, gives our ids from there; the returned
    info's "path" names the place a scorer should load from.
    """
    files, info = hf_tokenizer_files(tokenizer)
    subdirectory = directory / TOKENIZER_SUBDIR
    subdirectory.mkdir()
    for name, data in files.items():
        (subdirectory / name).write_bytes(data)
    info.update(path=TOKENIZER_SUBDIR, top_level=False, checked_with=None)
    if not info["hf_tokenizer"]:
        return info
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
    except ImportError:  # checked with `tokenizers` only; written at the top level as for transformers 4
        info["checked_with"] = "tokenizers"
    else:
        info["checked_with"] = f"transformers {transformers.__version__}"
        problems = transformers_tokenizer_problems(subdirectory, tokenizer)
        if problems:
            raise ConvertError(f"transformers loads the exported {tokenizer.family} tokenizer with other ids than "
                               "ours: " + "; ".join(problems))
    for name, data in files.items():
        (directory / name).write_bytes(data)
    problems = transformers_tokenizer_problems(directory, tokenizer) if info["checked_with"] != "tokenizers" else []
    if problems:
        for name in files:
            (directory / name).unlink()
        info["note"] = (
            f"{info['checked_with']} loads a tokenizer from a qwen2 model directory as Qwen2Tokenizer, rebuilt "
            f"with Qwen2's NFC normalizer and pre-tokenizer, which give other ids for this {tokenizer.family} "
            f"tokenizer ({problems[0]}); so it is not written at the top level. Load it with "
            f"AutoTokenizer.from_pretrained(DIR/{TOKENIZER_SUBDIR}) (vLLM: --tokenizer DIR/{TOKENIZER_SUBDIR})")
    else:
        info.update(path=".", top_level=True)
    return info


def transformers_tokenizer_problems(directory: Path, tokenizer) -> list[str]:
    """How AutoTokenizer.from_pretrained(directory) differs from ours on the check texts (empty: not at all)."""
    from transformers import AutoTokenizer  # optional (the hf extra): only reached once it imported

    try:
        hf = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # whatever transformers raises, the answer is "not loadable from here"
        return [f"AutoTokenizer.from_pretrained failed: {type(e).__name__}: {e}"]
    problems = [f"{name}_token_id {got} != {wanted}"
                for name, got, wanted in (("eos", hf.eos_token_id, tokenizer.eos_id),
                                          ("pad", hf.pad_token_id, tokenizer.pad_id)) if got != wanted]
    for text in TOKENIZER_CHECK_TEXTS:
        theirs, ours = hf(text, add_special_tokens=False)["input_ids"], tokenizer.encode(text)
        if theirs != ours:
            problems.append(f"{text[:24]!r} -> {theirs[:8]}..., ours {ours[:8]}...")
    return problems


def check_hf_tokenizer(files: dict[str, bytes], info: dict, tokenizer) -> None:
    """Refuse an exported tokenizer that gives other ids than ours on a few texts."""
    tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    tok.encode_special_tokens = info["split_special_tokens"]
    problems = [f"{name} {token!r} is id {tok.token_to_id(token)}, ours {wanted}"
                for name, token, wanted in (("eos", tokenizer.eos_token, tokenizer.eos_id),
                                            ("pad", tokenizer.pad_token, tokenizer.pad_id))
                if tok.token_to_id(token) != wanted]
    for text in TOKENIZER_CHECK_TEXTS:
        theirs, ours = tok.encode(text, add_special_tokens=False).ids, tokenizer.encode(text)
        if theirs != ours:
            problems.append(f"{text[:30]!r} -> {theirs[:12]} ..., ours {ours[:12]} ...")
    if problems:
        raise ConvertError(f"the HF form of the {tokenizer.family} tokenizer gives other ids than ours: "
                           + "; ".join(problems))
