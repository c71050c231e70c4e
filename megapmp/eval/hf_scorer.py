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


class TransformersRewardScorer:
    """`score(prompts, responses)` with an HF directory written by `tools/convert_checkpoint.py to-hf`."""

    def __init__(self, directory: str | os.PathLike, *, batch_size: int = 16, device: str | None = None,
                 progress: bool = True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.directory = Path(directory)
        recipe_path = self.directory / "megapmp_scoring.json"
        if not recipe_path.exists():
            raise FileNotFoundError(f"{recipe_path}: not a megapmp export (the input recipe is missing)")
        self.recipe = json.loads(recipe_path.read_text())
        tokenizer_dir = self.directory / self.recipe.get("tokenizer", {}).get("path", ".")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForSequenceClassification.from_pretrained(self.directory).to(self.device).eval()
        self.template = self.recipe["template"]["text"]
        self.eos = [self.recipe["eos_token_id"]] if self.recipe["eos_policy"] == "response" else []
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size
        self.progress = progress

    def describe(self) -> dict:
        return {"kind": "transformers", "path": str(self.directory), "template": {"text": self.template},
                "eos_policy": self.recipe["eos_policy"], "pad_id": self.pad_id,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def _ids(self, prompt: str, response: str) -> list[int]:
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return encode(self.template.replace("{prompt}", prompt)) + encode(response) + self.eos

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        from tqdm import tqdm

        sequences = [self._ids(p, r) for p, r in zip(prompts, responses)]
        order = np.argsort([-len(s) for s in sequences], kind="stable")  # similar lengths share a batch
        out = np.empty(len(sequences), np.float64)
        for start in tqdm(range(0, len(order), self.batch_size), desc="score (transformers)", unit="batch",
                          disable=not self.progress):
            members = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in members)
            ids = torch.full((len(members), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(members):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[members] = logits[:, 0].float().cpu().numpy()
        return out

    def score_pairs(self, prompts, chosen, rejected):
        rewards = self.score(list(prompts) * 2, list(chosen) + list(rejected))
        return rewards[: len(prompts)], rewards[len(prompts):]
