"""Scoring an exported reward model with `transformers` alone.

This is the independent check of an HF export: it uses no megapmp model, tokenizer or packing code,
only `AutoTokenizer`, `AutoModelForSequenceClassification` and the input recipe the exporter wrote to
`megapmp_scoring.json` (template, EOS policy, pad id, tokenizer folder). Inputs are built the way any
HF scorer would: prompt tokens + response tokens (+ EOS), right-padded, the model's own pooling of
the last non-pad token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from megapmp.convert.source import SCORING_FILE, ConvertError
from megapmp.device import pick_device


class TransformersRewardScorer:
    """`score(prompts, responses)` with an HF directory written by `megapmp.convert.export.export_to_hf`.

    dtype: the dtype the model computes in (default: as transformers loads it). An export whose tokenizer
    has no HF form (SentencePiece: megapmp_scoring.json says hf_tokenizer false) scores token ids only.
    """

    def __init__(self, directory: str | os.PathLike, *, batch_size: int = 16, device: str | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # optional: the hf extra

        self.directory = Path(directory)
        recipe_path = self.directory / SCORING_FILE
        if not recipe_path.exists():
            raise ConvertError(f"{recipe_path}: not a megapmp export (the input recipe is missing)")
        self.recipe = json.loads(recipe_path.read_text())
        tokenizer_info = self.recipe.get("tokenizer", {})
        self.tokenizer = None
        if tokenizer_info.get("hf_tokenizer", True):
            self.tokenizer = AutoTokenizer.from_pretrained(self.directory / tokenizer_info.get("path", "."))
        self.device = pick_device(device)
        model_kwargs = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForSequenceClassification.from_pretrained(self.directory, **model_kwargs)
        self.model = self.model.to(self.device).eval()
        self.template = self.recipe["template"]["text"]
        self.eos = [self.recipe["eos_token_id"]] if self.recipe["eos_policy"] == "response" else []
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size
        self.progress = progress

    def describe(self) -> dict:
        return {"kind": "transformers", "path": str(self.directory), "template": {"text": self.template},
                "eos_policy": self.recipe["eos_policy"], "pad_id": self.pad_id,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def input_ids(self, prompt: str, response: str) -> list[int]:
        """The ids of one (prompt, response) by the recipe: tokenized separately, no special tokens."""
        if self.tokenizer is None:
            raise ConvertError(f"{self.directory}: its tokenizer has no HF form; score token ids instead")

        def encode(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = encode(self.template.replace("{prompt}", prompt)) + encode(response) + self.eos
        if ids and ids[-1] == self.pad_id:
            # Without EOS the reward is read at the response's last token; the model's pooling would skip a pad.
            raise ConvertError(f"the response ends in the pad token (id {self.pad_id}): with eos_policy "
                               f"{self.recipe['eos_policy']!r} transformers would not read the reward there")
        return ids

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.score_ids([self.input_ids(p, r) for p, r in zip(prompts, responses)])

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float64 score of each id sequence (the pooled last non-pad token), in order."""
        order = np.argsort([-len(s) for s in sequences], kind="stable")  # similar lengths share a batch
        out = np.empty(len(sequences), np.float64)
        for start in tqdm(range(0, len(order), self.batch_size), desc="score (transformers)", unit="batch",
                          disable=not self.progress):
            members = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in members)
            ids = torch.full((len(members), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(members):
                ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]))
                mask[row, : len(sequences[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[members] = logits[:, 0].double().cpu().numpy()
        return out

    def score_pairs(self, prompts, chosen, rejected):
        rewards = self.score(list(prompts) * 2, list(chosen) + list(rejected))
        return rewards[: len(prompts)], rewards[len(prompts):]
