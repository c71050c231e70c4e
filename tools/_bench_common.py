"""Pieces the benchmarks share (tools/bench_train.py, tools/bench_mfu.py, bench_shapes.py, bench_scoring.py): CodePMP-shaped random pairs,
a real pair shard written from them, the seed approach's training step, and process memory readings.

The seed approach (``BaselineSide``) is CodePMP's reward_trainer.py: HF Qwen2ForSequenceClassification on
right-padded rows, the chosen and rejected rows of each pair interleaved, a separate lm_head over every
position of the chosen rows, full fp32 logits and their shifted ``.contiguous()`` copy, CrossEntropyLoss on the
chosen-response tokens; HF gradient checkpointing optional (CodePMP's launch script turns it on).
"""

from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megapmp.config import ModelConfig
from megapmp.convert.hf import to_hf_config, to_hf_state_dict
from megapmp.data.datasets import Pair
from megapmp.data.packing import IGNORE_INDEX
from megapmp.io import get_logger
from megapmp.optim import build_optimizer

PAD_ID, EOS_ID = 0, 1  # random token ids are drawn from [2, vocab): pad never equals a real token

log = get_logger("bench")


# --------------------------------------------------------------------------------------------------
# Command lines


def length_range(text: str) -> tuple[int, int]:
    """argparse type of a --prompt-len / --response-len range: "LO,HI" with 1 <= LO <= HI."""
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI (two integers)") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI with 1 <= LO <= HI")
    return lo, hi


# --------------------------------------------------------------------------------------------------
# Devices and data


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16}[precision]


def random_pairs(rng: np.random.Generator, n: int, prompt_len: tuple[int, int], response_len: tuple[int, int],
                 vocab: int) -> list[Pair]:
    """``n`` CodePMP-shaped pairs: lengths uniform in the inclusive ranges (a response's includes its EOS),
    every response ending with EOS, ids in [2, vocab) so none equals PAD or EOS."""
    pairs = []
    for _ in range(n):
        p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        c, r = (int(rng.integers(response_len[0], response_len[1] + 1)) for _ in range(2))
        prompt = rng.integers(2, vocab, p, dtype=np.int64)
        chosen, rejected = (np.append(rng.integers(2, vocab, n - 1, dtype=np.int64), EOS_ID) for n in (c, r))
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


def real_tokens(pairs) -> int:
    """Tokens of the pairs as two sequences each: len([P C]) + len([P R])."""
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def write_pair_shard(prefix: str | os.PathLike, pairs: list[Pair], vocab_size: int) -> str:
    """A real pair shard (PREFIX.bin/.idx/.json, as tools/preprocess_pairs.py writes them) holding ``pairs``
    as already-tokenized ids, for the trainer's own loader. There is no tokenizer behind random ids: the
    sidecar names a "synthetic" one with the vocabulary, EOS and PAD the ids were drawn for."""
    from megapmp.data.indexed import IndexedWriter, optimal_dtype
    from megapmp.data.shards import ShardMeta, shard_checksums, shard_sizes
    from megapmp.data.tokenizers import padded_vocab_size

    prefix = str(prefix)
    dtype = optimal_dtype(vocab_size)
    with IndexedWriter(prefix, dtype) as writer:
        for pair in pairs:
            writer.add_document([pair.prompt, pair.chosen, pair.rejected])
        counts = {"pairs": writer.num_documents, "sequences": writer.num_sequences, "tokens": writer.num_elements}
    tokenizer = {"family": "synthetic", "spec": "synthetic", "sha256": None, "vocab_size": vocab_size,
                 "eos_id": EOS_ID, "pad_id": PAD_ID, "eos_token": None, "pad_token": None, "added_tokens": []}
    ShardMeta(kind="pairs", tokenizer=tokenizer, vocab_size=vocab_size,
              padded_vocab_size=padded_vocab_size(vocab_size, 128), vocab_multiple=128, eos_id=EOS_ID,
              pad_id=PAD_ID, dtype=dtype.name, counts=counts, checksums=shard_checksums(prefix),
              sizes=shard_sizes(prefix)).save(prefix)
    return prefix


# --------------------------------------------------------------------------------------------------
# Process memory (CPU): the resident set and its high-water mark


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current VmRSS (Linux); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def return_freed_memory_to_os() -> bool:
    """Make glibc give every allocation over 128 KiB its own mmap and trim freed memory at once, so the
    resident set tracks live tensor bytes rather than malloc's free lists (in-process equivalent of the
    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0 environment). False where mallopt is absent."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 131072)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 0))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# The seed approach's step


class Side:
    name = "?"

    def __init__(self, args, config, device, optimizer_backend: str = "torch"):
        self.args, self.config, self.device = args, config, device
        self.amp = amp_dtype(args.precision, device)
        self.optimizer_backend = optimizer_backend

    def _optimizer(self, model):
        optimizer, _ = build_optimizer(model, lr=self.args.lr, weight_decay=self.args.weight_decay,
                                       betas=(0.9, 0.95), eps=1e-8, backend=self.optimizer_backend)
        return optimizer

    def _finish(self, loss=None) -> None:
        """The optimizer step after the backward (``loss``: a last loss still to differentiate)."""
        if loss is not None:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)


class BaselineSide(Side):
    """The seed approach. ``args`` supplies precision, lr, weight_decay, grad_clip, rm_coef and lm_coef.

    ``micro_batches`` > 1 splits the step's pairs into that many contiguous groups, one forward + backward
    each, gradients accumulated (HF Trainer's gradient_accumulation_steps). The loss is normalised by the
    whole step's pairs and LM target tokens, as megapmp's trainer does, so both compute the same loss from
    the same weights; with one micro-batch that is exactly CodePMP's per-batch mean. (HF's per-micro-batch
    means would weight the LM tokens slightly differently; the cost of the step is the same.)"""

    name = "baseline"

    def __init__(self, args, config: ModelConfig, device, state_dict, *, micro_batches: int = 1,
                 gradient_checkpointing: bool = False, optimizer_backend: str = "torch"):
        super().__init__(args, config, device, optimizer_backend)
        from transformers import Qwen2Config, Qwen2ForSequenceClassification

        self.micro_batches = micro_batches
        hf_config = Qwen2Config(**to_hf_config(config, pad_token_id=PAD_ID, eos_token_id=EOS_ID))
        model, self.attn_implementation = None, None
        for implementation in ("sdpa", "eager"):
            try:
                hf_config._attn_implementation = implementation
                with torch.device(device):  # built in place: its random init (overwritten below) not on the host
                    model = Qwen2ForSequenceClassification(hf_config)
                self.attn_implementation = implementation
                break
            except (ValueError, ImportError) as error:  # sdpa unsupported here: fall back to eager
                log(f"baseline: attn_implementation={implementation} failed ({error})")
        model.load_state_dict(to_hf_state_dict(state_dict, config, include_lm_head=False))
        # CodePMP: model.lm_head = AutoModelForCausalLM.from_pretrained(...).lm_head, a separate Linear.
        model.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            with torch.no_grad():
                model.lm_head.weight.copy_(state_dict["lm_head.weight"].to(device))
        if gradient_checkpointing:
            # What HF Trainer's --gradient_checkpointing does (transformers 5 renamed the method).
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        self.gradient_checkpointing = gradient_checkpointing
        self.model = model.to(device).train()
        self.optimizer = self._optimizer(self.model)

    @staticmethod
    def collate(pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CodePMP's RewardDataCollatorWithPadding: rows chosen0, rejected0, chosen1, ... right-padded to the
        longest; labels = the chosen-response tokens of the chosen rows, IGNORE_INDEX elsewhere."""
        rows = []
        for p in pairs:
            rows += [np.concatenate([p.prompt, p.chosen]), np.concatenate([p.prompt, p.rejected])]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), PAD_ID, np.int64)
        attention_mask = np.zeros((len(rows), width), np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)], attention_mask[i, : len(row)] = row, 1
        for i, p in enumerate(pairs):
            start = len(p.prompt)
            labels[2 * i, start : start + len(p.chosen)] = p.chosen
        return input_ids, attention_mask, labels

    def _micro_step(self, pairs, global_pairs: int, global_lm_tokens: int):
        """Forward + backward of one micro-batch; returns its detached (loss, rm, lm) shares and its padded
        shape. Counted on the host arrays: no device sync here."""
        arrays = self.collate(pairs)
        input_ids, attention_mask, labels = (torch.from_numpy(a).to(self.device) for a in arrays)
        with self.autocast():
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                output_hidden_states=True)
            rewards = output.logits.float()  # [2N, 1], pooled at the last non-pad token
            rm_loss = -F.logsigmoid(rewards[::2] - rewards[1::2]).sum() / global_pairs
            hidden = output.hidden_states[-1][::2]  # [N, W, H], final-normed
            if self.amp is not None:
                hidden = hidden.to(self.amp)
            logits = self.model.lm_head(hidden).float()  # [N, W, V]: every position of every chosen row
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[::2][..., 1:].contiguous()
            lm_loss = F.cross_entropy(shift_logits.view(-1, self.config.vocab_size), shift_labels.view(-1),
                                      reduction="sum") / global_lm_tokens
            loss = self.args.rm_coef * rm_loss + self.args.lm_coef * lm_loss
        loss.backward()
        return torch.stack([loss.detach(), rm_loss.detach(), lm_loss.detach()]), arrays

    def step(self, pairs) -> dict:
        groups = np.array_split(np.arange(len(pairs)), self.micro_batches)
        global_lm_tokens = sum(len(p.chosen) for p in pairs)  # every chosen token is a target (shifted by one)
        sums, shapes, real, row, lm = 0, [], 0, 0, 0
        for group in groups:
            shares, (input_ids, attention_mask, labels) = self._micro_step([pairs[i] for i in group], len(pairs),
                                                                           global_lm_tokens)
            sums = sums + shares
            shapes.append(tuple(input_ids.shape))
            real += int(attention_mask.sum())
            row += int(input_ids.size)
            lm += int((labels != IGNORE_INDEX).sum())
        self._finish()
        loss, rm_loss, lm_loss = sums.tolist()  # the step's one read-back
        return {"loss": loss, "rm_loss": rm_loss, "lm_loss": lm_loss, "real_tokens": real, "lm_tokens": lm,
                "row_tokens": row, "shapes": shapes}
