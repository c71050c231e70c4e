"""A trained pairwise judge as a scorer: (instruction, code a, code b) -> P(a is better), both orders averaged.

The judge is a megapmp model trained on judge samples (megapmp.data.judge; tools/make_judge_data.py): its
checkpoint records the judge format (template, the two labels and their token ids) through its training
shard. For one order, the judge's input is the template filled with (instruction, first code, second code,
criterion), tokenized with the model's recipe, and its verdict is read at the input's last token: the
log-odds ``x = logit(first label) - logit(second label)`` of the LM head, i.e. P(first code is better) =
sigmoid(x), the softmax over the two labels (the rest of the vocabulary plays no part).

Both orders (CodeFavor's judges are trained and evaluated so that position carries no signal): with
``x1`` the log-odds when a is shown first and ``x2`` when b is shown first,

    P(a better) = ( sigmoid(x1) + (1 - sigmoid(x2)) ) / 2 = 1/2 + ( sigmoid(x1) - sigmoid(x2) ) / 2

so a judge that always answers the first label (x1 = x2) gives exactly 1/2: a tie, which CodeFavor's
evaluation counts as half right. a wins iff x1 > x2.

Scores are batch-invariant (megapmp.eval.batch_invariant, as the reward server's): a comparison's log-odds
are the same bits whatever else is scored with it. Only the two label rows of the LM head are kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megapmp.convert.source import (CHECKPOINT, SCORING_FILE, ConvertError, ScoringRecipe, find_model_source,
                                    load_model_source, scoring_recipe)
from megapmp.data.judge import JudgeFormat
from megapmp.eval.batch_invariant import score_sequences as score_invariant
from megapmp.eval.reward_model import RewardScorer, _encode_batch
from megapmp.model import Qwen2RewardModel


# The longest code the reward server judges, in characters per token of the judge's context: the judge reads
# at most max_length tokens of an input, and a code that took 16 characters a token would already be several
# contexts long (code runs 3-4 characters a BPE token, 1 a byte token). Past it, POST /compare refuses the
# request before rendering it: stripping comments parses a code whole (ast.parse and ast.unparse held ~500
# bytes of memory per byte of code: 0.9 GB and 10 s of CPU for one 1.9 MB code, under the body limit).
CODE_CHARS_PER_TOKEN = 16


def recorded_judge(path: str | os.PathLike) -> dict | None:
    """The judge format a model source records (its training shard's, or its export's), without reading its
    weights; None for a reward model."""
    kind, directory = find_model_source(path)
    try:
        if kind == CHECKPOINT:
            state = json.loads((directory / "trainer.json").read_text())
            return (state.get("shard_meta") or {}).get("judge")
        if (directory / SCORING_FILE).is_file():
            return json.loads((directory / SCORING_FILE).read_text()).get("judge")
    except (OSError, ValueError) as e:
        raise ConvertError(f"{directory}: unreadable record ({e})") from None
    return None


def probability_first_better(x_first, x_second) -> np.ndarray:
    """P(a better) from the log-odds of the first label with a shown first (x_first) and with b shown first
    (x_second); exactly 1/2 where they are equal (module docstring). sigmoid(x) = (1 + tanh(x/2)) / 2, which
    does not overflow."""
    x_first, x_second = np.asarray(x_first, np.float64), np.asarray(x_second, np.float64)
    return 0.5 + 0.25 * (np.tanh(x_first / 2) - np.tanh(x_second / 2))


@dataclass
class Comparison:
    """Judgements of N comparisons (a_i vs b_i)."""

    log_odds: np.ndarray  # [N, 2] float64: log-odds of the first label with a first (col 0) and with b first (col 1)
    probability: np.ndarray  # [N] float64: P(a is better), both orders averaged
    truncated: list[int]  # comparisons with an input cut to the model's context (in either order)


class JudgeScorer(RewardScorer):
    """A pairwise judge. ``compare(instructions, codes_a, codes_b)`` -> :class:`Comparison`;
    ``score_sequences(ids)`` -> the first label's log-odds of each already tokenized input (batch-invariant:
    the reward server's batcher calls it). Build one with :meth:`load`."""

    def __init__(self, model, label_weight: torch.Tensor, recipe: ScoringRecipe, **kwargs):
        if not recipe.judge:
            raise ValueError("the recipe records no judge format: not a pairwise judge")
        kwargs["batch_invariant"] = True  # the only path a judge is scored on
        super().__init__(model, recipe, **kwargs)
        self.format = JudgeFormat.from_meta(recipe.judge)
        self.label_ids = tuple(int(i) for i in recipe.judge["label_ids"])
        if label_weight.shape[0] != 2:
            raise ValueError(f"label_weight must hold the 2 label rows of the LM head, got {tuple(label_weight.shape)}")
        self.label_weight = label_weight.detach().to(self.device)  # [2, H]

    @classmethod
    def load(cls, path: str | os.PathLike, *, tokenizer: str | None = None, dtype: str | None = None,
             template: str | None = None, eos_policy: str | None = None, **kwargs) -> "JudgeScorer":
        """A judge from any model source (a run, checkpoint or HF export) that records a judge format.
        ``template`` / ``eos_policy`` overrides are refused: a judge's input recipe is its training format."""
        if template is not None or eos_policy is not None:
            raise ConvertError("a pairwise judge's inputs are its recorded judge format: --template and "
                               "--eos-policy do not apply")
        source = load_model_source(path)
        recipe = scoring_recipe(source, tokenizer=tokenizer)
        if not recipe.judge:
            raise ConvertError(f"{path} is not a pairwise judge: its training data recorded no judge format "
                               "(a reward model: use --judge reward)")
        if not source.has_lm_head:
            raise ConvertError(f"{path}: no LM head, which a judge answers with")
        model, label_weight = build_judge_model(source.config, source.state_dict, recipe.judge["label_ids"],
                                                dtype=dtype, source=str(path))
        info = source.describe()
        info.update(dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    parameters=sum(p.numel() for p in model.parameters()) + label_weight.numel())
        return cls(model, label_weight, recipe, info=info, **kwargs)

    @property
    def max_code_chars(self) -> int:
        """The longest code (in characters) the reward server judges: CODE_CHARS_PER_TOKEN per token of context."""
        return CODE_CHARS_PER_TOKEN * self.max_length

    def describe(self) -> dict:
        return {**super().describe(), "judge": {"labels": list(self.format.labels), "label_ids": list(self.label_ids),
                                                "template": self.format.template_name,
                                                "strip_comments": self.format.strip_comments}}

    # -- inputs ---------------------------------------------------------------------------------

    def judge_sequences(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Ids of rendered judge inputs (the recipe's prompt template applied), and whether each was cut.
        An input over the context loses its beginning, as preprocessing cut overlong judge samples: the
        codes and the question at its end are kept, with room for the label."""
        text = self.recipe.template["text"]
        ids = _encode_batch(self.recipe.tokenizer, [text.replace("{prompt}", t) for t in texts])
        room = self.max_length - 1
        return [x[-room:] if len(x) > room else x for x in ids], [len(x) > room for x in ids]

    def render(self, instructions, codes_a, codes_b, criteria=None, strip_comments=None) -> tuple[list[str], list[str]]:
        """The judge inputs of both orders: (a first, b first). ``criteria``: one per comparison, or None for
        the format's default; ``strip_comments``: one bool per comparison, or None for the format's setting."""
        n = len(instructions)
        if not len(codes_a) == len(codes_b) == n:
            raise ValueError(f"{n} instructions, {len(codes_a)} codes a, {len(codes_b)} codes b")
        criteria = [None] * n if criteria is None else list(criteria)
        strip = [self.format.strip_comments] * n if strip_comments is None else list(strip_comments)
        if len(criteria) != n or len(strip) != n:
            raise ValueError(f"{n} comparisons, {len(criteria)} criteria, {len(strip)} strip_comments")
        first, second = [], []
        for i, a, b, c, s in zip(instructions, codes_a, codes_b, criteria, strip):
            fmt = self.format if s == self.format.strip_comments else replace(self.format, strip_comments=s)
            first.append(fmt.render(i, a, b, c))
            second.append(fmt.render(i, b, a, c))
        return first, second

    # -- scoring --------------------------------------------------------------------------------

    def label_log_odds(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] hidden states at the answer position -> fp32 [N] logit(first label) - logit(second label)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = F.linear(hidden.float(), self.label_weight.float())  # [N, 2]
        return logits[:, 0] - logits[:, 1]

    def _score_invariant(self, sequences) -> np.ndarray:
        return score_invariant(self.model, sequences, pad_id=self.recipe.pad_id, device=self.device,
                               autocast_dtype=self.autocast_dtype, tile_tokens=self.tile_tokens, packing=self.packing,
                               head=self.label_log_odds)

    def log_odds(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """The first label's log-odds for each rendered judge input (and whether it was cut)."""
        sequences, cut = self.judge_sequences(texts)
        self.truncated += sum(cut)
        order = np.argsort([-len(s) for s in sequences], kind="stable")  # similar lengths share a forward
        out = np.empty(len(sequences))
        out[order] = self.score_sequences([sequences[i] for i in order], progress="judging")
        return out, cut

    def compare(self, instructions: Sequence[str], codes_a: Sequence[str], codes_b: Sequence[str],
                criteria: Sequence[str | None] | None = None,
                strip_comments: Sequence[bool] | None = None) -> Comparison:
        """Judge a_i against b_i for every i, in both orders. Batch-invariant: comparison i's numbers do not
        depend on the others."""
        first, second = self.render(instructions, codes_a, codes_b, criteria, strip_comments)
        x, cut = self.log_odds(first + second)
        n = len(first)
        log_odds = np.stack([x[:n], x[n:]], axis=1)
        truncated = [i for i in range(n) if cut[i] or cut[n + i]]
        return Comparison(log_odds, probability_first_better(log_odds[:, 0], log_odds[:, 1]), truncated)

    def score(self, prompts, responses):
        raise TypeError("a pairwise judge compares two codes (compare()); it gives no reward to one response")

    def score_pairs(self, prompts, chosen, rejected):
        raise TypeError("a pairwise judge compares two codes (compare()); it gives no reward to one response")


def build_judge_model(config, state_dict: dict, label_ids: Sequence[int], *, dtype: str | None = None,
                      source: str = "") -> tuple[Qwen2RewardModel, torch.Tensor]:
    """The decoder without heads, and the LM head's rows of the two labels [2, H] (the embedding's rows
    when the head is tied to it): all a judge needs, without the [V, H] head."""
    head = state_dict.get("lm_head.weight")
    if head is None:
        head = state_dict["embed_tokens.weight"]  # tied
    if max(label_ids) >= head.shape[0]:
        raise ConvertError(f"{source}: label ids {list(label_ids)} outside the vocabulary of {head.shape[0]}")
    label_weight = head[list(label_ids)].clone()
    state = {k: v for k, v in state_dict.items() if k not in ("lm_head.weight", "score.weight") and v is not None}
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConvertError(f"dtype {dtype!r} is not float32, bfloat16 or float16")
        target = getattr(torch, dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
        label_weight = label_weight.to(target)
    with torch.device("meta"):
        model = Qwen2RewardModel(config, with_lm_head=False, with_score=False)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConvertError(f"{source}: the weights do not fit the model config: {e}") from None
    model.rotary.inv_freq = model.rotary._inv_freq(device="cpu")  # non-persistent: rebuilt, fp32
    return model, label_weight


def load_scorer(path: str | os.PathLike, **kwargs) -> RewardScorer:
    """A JudgeScorer when the model source records a judge format, else a RewardScorer (what a server or an
    evaluation loads when it is not told which the model is)."""
    cls = JudgeScorer if recorded_judge(path) else RewardScorer
    return cls.load(path, **kwargs)
