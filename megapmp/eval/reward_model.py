"""Score (prompt, response) texts with a trained reward model: a megapmp checkpoint or an HF directory.

Inputs are built exactly as training built them (tools/preprocess_pairs.py, and the recipe that
tools/convert_checkpoint.py writes into ``megapmp_scoring.json``)::

    prompt ids   = tokenizer.encode(template.text with "{prompt}" replaced by the prompt)
    response ids = tokenizer.encode(response) + ([eos_id] if eos_policy == "response" else [])
    reward       = the score head at the response's last token

The model, its tokenizer and that recipe come from ``megapmp.convert.source`` (a megapmp checkpoint
of any layout, or an HF directory; its docstring says where the recipe is read from).

Scoring packs all the responses of one prompt behind one copy of it (the group layout ``[P R1 ... RK]``,
where each Ri sees P and itself only: megapmp.data.packing.pack_groups), so a Best-of-N candidate set
encodes each prompt once per row instead of once per candidate; a set longer than a forward is cut into
sub-groups, each repeating the prompt. ``layout="shared-prefix"`` packs responses two at a time ``[P R1 R2]``
(an odd one out paired with a one-token dummy whose score is discarded), ``layout="duplicated"`` one
``[P R]`` per candidate. Results do not depend on the layout beyond floating-point rounding. Attention
runs on ``attention_backend`` ("auto": the trainer's choice for the device, e.g. segmented on a CPU).

``batch_invariant=True`` scores through ``megapmp.eval.batch_invariant`` instead: each (prompt, response)
is one causal sequence (no shared prefix) and a text's reward is the same bits whatever it is batched
with (the reward server, tools/serve_rm.py, always scores this way).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from megapmp.convert.source import ConvertError, ScoringRecipe, load_model_source, scoring_recipe
from megapmp.data.datasets import Pair
from megapmp.data.groups import Group
from megapmp.data.packing import flatten_rows, pack_groups, pair_packed_length
from megapmp.data.preprocess import fit_pair, resolve_template
from megapmp.data.shards import EOS_POLICIES
from megapmp.device import autocast_dtype, pick_device
from megapmp.eval.batch_invariant import DEFAULT_TILE_TOKENS, PACKINGS, invariant_attention_backend
from megapmp.eval.batch_invariant import score_sequences as score_invariant
from megapmp.loss import fp32_rewards, score_pairs
from megapmp.model import Qwen2RewardModel
from megapmp.model.attention import attention_inputs, resolve_attention_backend

SCORING_LAYOUTS = ("group", "shared-prefix", "duplicated")


class RewardScorer:
    """A reward model plus the recipe that turns texts into its inputs.

    ``score(prompts, responses)`` -> float64 rewards, one per (prompt, response), in order.
    ``score_pairs(prompts, chosen, rejected)`` -> (r_chosen, r_rejected).
    Build one with :meth:`load` (a checkpoint or HF directory) or directly from a model and a recipe.
    """

    def __init__(self, model, recipe: ScoringRecipe, *, device=None, precision: str = "auto",
                 seq_len: int = 0, batch_tokens: int = 16384, layout: str = "group",
                 max_length: int | None = None, progress: bool = True, info: dict | None = None,
                 batch_invariant: bool = False, tile_tokens: int = DEFAULT_TILE_TOKENS,
                 packing: str = "flat", attention_backend: str = "auto"):
        if layout not in SCORING_LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(SCORING_LAYOUTS)}")
        problems = recipe.problems(model.config.vocab_size)  # the rules every shard's sidecar is held to
        if problems:
            raise ValueError(f"the scoring recipe from {recipe.origin} is unusable: {'; '.join(problems)}")
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.recipe = recipe
        self.precision = precision
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.seq_len = int(seq_len)
        self.batch_tokens = int(batch_tokens)
        self.layout = layout
        # Longer inputs are cut with the preprocessing policy. Not the training shard's max_length by default:
        # evaluation texts may legitimately be longer than training pairs were allowed to be.
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.progress = progress
        self.info = dict(info or {})
        self.truncated = 0  # responses truncated to max_length so far
        # The batch-invariant path (module docstring): its GEMM tile and how its sequences are laid out.
        if packing not in PACKINGS:
            raise ValueError(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
        self.batch_invariant = bool(batch_invariant)
        self.tile_tokens = int(tile_tokens)
        self.packing = packing
        compute_dtype = self.autocast_dtype or next(model.parameters()).dtype
        if self.batch_invariant:
            # The model is this scorer's own: set its per-sequence attention backend once, so that forwards
            # from several threads never see another's temporary setting.
            self.model.set_attention_backend(invariant_attention_backend(self.device, compute_dtype))
        else:
            # A group row is as long as a candidate set: a dense [S, S] mask per row (sdpa) would cost the
            # square of it, a varlen backend only the real attention problems.
            self.model.set_attention_backend(resolve_attention_backend(attention_backend, self.device, compute_dtype))

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, tokenizer: str | None = None, template: str | None = None,
             eos_policy: str | None = None, dtype: str | None = None, **kwargs) -> "RewardScorer":
        """A scorer for a megapmp checkpoint (step dir; run or checkpoints dir -> newest step) or an HF
        directory (config.json + weights). ``tokenizer``: a spec/directory replacing the recorded one;
        ``template``: none | codepmp | a template file, replacing the recorded one; ``eos_policy``:
        response | none; ``dtype``: cast the weights (float32, bfloat16, float16; default as stored).
        Other keyword arguments go to the constructor (device, precision, seq_len, batch_tokens, ...)."""
        source = load_model_source(path)
        recipe = scoring_recipe(source, tokenizer=tokenizer)
        if recipe.judge:  # its reward head was never trained: the judge answers with label tokens
            raise ConvertError(f"{path} is a pairwise judge, not a reward model: evaluate it with --judge pairwise "
                               "(megapmp.eval.judge_scorer.JudgeScorer)")
        if template is not None:
            name, text = resolve_template(template)
            recipe.template = {"name": name, "text": text}
            recipe.notes.append(f"template overridden by {template!r}")
        if eos_policy is not None:
            if eos_policy not in EOS_POLICIES:
                raise ConvertError(f"eos_policy {eos_policy!r} is not one of {', '.join(EOS_POLICIES)}")
            recipe.eos_policy = eos_policy
            recipe.notes.append(f"eos_policy overridden by {eos_policy!r}")
        model = build_scoring_model(source.config, source.state_dict, dtype=dtype, source=str(path))
        info = source.describe()
        info.update(dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    parameters=sum(p.numel() for p in model.parameters()))
        return cls(model, recipe, info=info, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------

    def describe(self) -> dict:
        """What a report should record about the model and how its inputs were built."""
        r = self.recipe
        tok = r.tokenizer
        return {**self.info, "template": dict(r.template), "eos_policy": r.eos_policy, "eos_id": r.eos_id,
                "pad_id": r.pad_id, "recipe_from": r.origin, "notes": list(r.notes),
                "tokenizer": {"family": getattr(tok, "family", None), "spec": tok.spec(),
                              "vocab_size": getattr(tok, "vocab_size", None)},
                "device": str(self.device), "precision": self.precision, "layout": self.layout,
                "attention_backend": self.model.attention_backend,
                "max_length": self.max_length, "truncated_responses": self.truncated,
                "batch_invariant": self.batch_invariant,
                **({"tile_tokens": self.tile_tokens, "packing": self.packing} if self.batch_invariant else {})}

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        text = self.recipe.template["text"]
        return _encode_batch(self.recipe.tokenizer, [text.replace("{prompt}", p) for p in prompts])

    def encode_responses(self, responses: Sequence[str]) -> list[list[int]]:
        eos = [self.recipe.eos_id] if self.recipe.eos_policy == "response" else []
        return [ids + eos for ids in _encode_batch(self.recipe.tokenizer, responses)]

    def sequences(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """The input ids of each (prompt, response) as one sequence (prompt ids + response ids), cut to
        max_length with the preprocessing policy; and whether each was cut."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        unique = list(dict.fromkeys(prompts))
        prompt_ids = dict(zip(unique, self.encode_prompts(unique)))
        out, cut = [], []
        for i, (p, response) in enumerate(zip(prompts, self.encode_responses(responses))):
            if not response:
                raise ValueError(f"response {i} is empty: with eos_policy 'none' it has no token to read a reward at")
            prompt = prompt_ids[p]
            overlong = len(prompt) + len(response) > self.max_length
            if overlong:
                prompt, response = self._truncate(prompt, response)
            out.append(list(prompt) + list(response))
            cut.append(overlong)
        return out, cut

    def joined_sequences(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Input ids of texts in which the prompt (template applied) and the response are already joined
        (OpenRLHF's ``query``): the whole text is tokenized as a response (+ EOS by the recipe), cut from
        the right like a response when too long. A tokenizer may split the joint differently from a
        separately tokenized prompt and response, so these ids can differ from :meth:`sequences`'."""
        out, cut = [], []
        for i, ids in enumerate(self.encode_responses(texts)):
            if not ids:
                raise ValueError(f"text {i} is empty: it has no token to read a reward at")
            overlong = len(ids) > self.max_length
            out.append(self._truncate([], ids)[1] if overlong else ids)
            cut.append(overlong)
        return out, cut

    # -- scoring --------------------------------------------------------------------------------

    def score_sequences(self, sequences: Sequence[Sequence[int]], progress: str | None = None) -> np.ndarray:
        """float64 reward at the last token of each id sequence, batch-invariant (the same bits whatever the
        other sequences); cut into forwards of about ``batch_tokens`` tokens, in order. ``progress``: the
        description of a progress bar (shown with self.progress, from 64 sequences)."""
        out, batch, used = [], [], 0
        bar = tqdm(total=len(sequences), unit="input", desc=progress, file=sys.stderr, dynamic_ncols=True,
                   disable=progress is None or not self.progress or len(sequences) < 64)
        for ids in list(sequences) + [None]:
            if batch and (ids is None or used + len(ids) > self.batch_tokens):
                out.append(self._score_invariant(batch))
                bar.update(len(batch))
                batch, used = [], 0
            if ids is not None:
                batch.append(ids)
                used += len(ids)
        bar.close()
        return np.concatenate(out) if out else np.empty(0)

    def _score_invariant(self, sequences) -> np.ndarray:
        return score_invariant(self.model, sequences, pad_id=self.recipe.pad_id, device=self.device,
                               autocast_dtype=self.autocast_dtype, tile_tokens=self.tile_tokens, packing=self.packing)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """float64 reward of each (prompts[i], responses[i])."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        n = len(responses)
        if n == 0:
            return np.empty(0)
        if self.batch_invariant:
            sequences, cut = self.sequences(prompts, responses)
            self.truncated += sum(cut)
            return self.score_sequences(sequences)
        unique = list(dict.fromkeys(prompts))
        prompt_ids = dict(zip(unique, self.encode_prompts(unique)))
        empty = [i for i, p in enumerate(prompts) if not prompt_ids[p]]
        if empty:  # packing reads a response after its prompt's last token: there must be one
            raise ValueError(f"prompt {empty[0]} is empty: with template {self.recipe.template['name']!r} it "
                             f"encodes to no token (evaluation data is checked for this at FILE:LINE)")
        response_ids = self.encode_responses(responses)
        empty = [i for i, ids in enumerate(response_ids) if not ids]
        if empty:
            raise ValueError(f"response {empty[0]} is empty: with eos_policy 'none' it has no token to read a reward at")
        if self.layout == "group":
            return self._score_groups(prompts, prompt_ids, response_ids)
        dummy = np.array([self.recipe.eos_id], np.int64)
        groups: dict[str, list[int]] = {}
        solo = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if self.max_length and len(prompt_ids[p]) + len(response_ids[i]) > self.max_length:
                solo.append(i)
            else:
                groups.setdefault(p, []).append(i)
        pairs, owners = [], []  # owners[k] = (index of the chosen slot, index of the rejected slot or -1)
        for p, members in groups.items():
            prompt = np.asarray(prompt_ids[p], np.int64)
            for j in range(0, len(members), 2):
                a = members[j]
                b = members[j + 1] if j + 1 < len(members) else -1
                pairs.append(Pair(prompt, np.asarray(response_ids[a], np.int64),
                                  np.asarray(response_ids[b], np.int64) if b >= 0 else dummy))
                owners.append((a, b))
        for i in solo:
            prompt, response = self._truncate(prompt_ids[prompts[i]], response_ids[i])
            pairs.append(Pair(np.asarray(prompt, np.int64), np.asarray(response, np.int64), dummy))
            owners.append((i, -1))
        self.truncated += len(solo)
        r_a, r_b = self.score_token_pairs(pairs, total_responses=n)
        out = np.empty(n, np.float64)
        for (a, b), x, y in zip(owners, r_a, r_b):
            out[a] = x
            if b >= 0:
                out[b] = y
        return out

    def score_pairs(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]):
        """(r_chosen, r_rejected) float64 arrays."""
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
        rewards = self.score(list(prompts) + list(prompts), list(chosen) + list(rejected))
        return rewards[: len(prompts)], rewards[len(prompts):]

    @torch.no_grad()
    def score_token_pairs(self, pairs: Sequence, total_responses: int | None = None):
        """(r_first, r_second) for already tokenized Pair objects, in order.

        Pairs are sorted longest first and cut into batches of about ``batch_tokens`` tokens; a batch's rows
        are as long as its longest pair (at least ``seq_len``, rounded up to 64), so attention, quadratic in
        the row length, is not spent on rows longer than needed; shorter pairs share rows."""
        n = len(pairs)
        if n == 0:
            return np.empty(0), np.empty(0)
        lengths = np.array([pair_packed_length(len(p.prompt), len(p.chosen), len(p.rejected), self.layout)
                            for p in pairs], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: first-fit-decreasing packing
        first, second = np.empty(n), np.empty(n)
        total = total_responses or 2 * n
        bar = tqdm(total=total, unit="resp", desc="scoring", disable=not self.progress or total < 256,
                   file=sys.stderr, dynamic_ncols=True)
        start = 0
        while start < n:
            stop, used = start, 0
            while stop < n and (stop == start or used + lengths[order[stop]] <= self.batch_tokens):
                used += int(lengths[order[stop]])
                stop += 1
            chunk = order[start:stop]
            row = max(self.seq_len, int(lengths[chunk[0]]))
            row = -(-row // 64) * 64
            r_c, r_r = score_pairs(self.model, [pairs[i] for i in chunk], seq_len=row, layout=self.layout,
                                   pad_id=self.recipe.pad_id, device=self.device, pairs_per_batch=len(chunk),
                                   autocast_dtype=self.autocast_dtype)
            first[chunk], second[chunk] = r_c, r_r
            bar.update(min(total - bar.n, 2 * len(chunk)))
            start = stop
        bar.close()
        return first, second

    def _score_groups(self, prompts: Sequence[str], prompt_ids: dict, response_ids: list[list[int]]) -> np.ndarray:
        """Each prompt's responses as group rows (module docstring); a response too long for max_length with
        its prompt is cut by the preprocessing policy and scored as a group of its own."""
        members: dict[str, list[int]] = {}
        cut = []
        for i, p in enumerate(prompts):
            if self.max_length and len(prompt_ids[p]) + len(response_ids[i]) > self.max_length:
                cut.append(i)
            else:
                members.setdefault(p, []).append(i)
        groups = []  # (prompt ids, [(candidate index, response ids)]), each at most batch_tokens tokens
        for p, owned in members.items():
            groups += _cut_group(prompt_ids[p], [(i, response_ids[i]) for i in owned], self.batch_tokens)
        for i in cut:
            prompt, response = self._truncate(prompt_ids[prompts[i]], response_ids[i])
            groups.append((prompt, [(i, response)]))
        self.truncated += len(cut)
        return self.score_token_groups(groups, total_responses=len(prompts))

    @torch.no_grad()
    def score_token_groups(self, groups, total_responses: int) -> np.ndarray:
        """float64 rewards of already tokenized groups, ``groups`` = [(prompt ids, [(out index, response ids),
        ...]), ...], each written at its out index. Groups are sorted longest first and packed into forwards
        of about ``batch_tokens`` tokens, one flat row each."""
        lengths = np.array([len(p) + sum(len(r) for _, r in owned) for p, owned in groups], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        out = np.full(total_responses, np.nan)
        bar = tqdm(total=total_responses, unit="resp", desc="scoring",
                   disable=not self.progress or total_responses < 256, file=sys.stderr, dynamic_ncols=True)
        start = 0
        while start < len(groups):
            stop, used = start, 0
            while stop < len(groups) and (stop == start or used + lengths[order[stop]] <= self.batch_tokens):
                used += int(lengths[order[stop]])
                stop += 1
            chunk = [groups[g] for g in order[start:stop]]
            tokens = [Group(np.asarray(p, np.int64), tuple(np.asarray(r, np.int64) for _, r in owned),
                            np.zeros(len(owned))) for p, owned in chunk]
            row = max(self.seq_len, int(lengths[order[start]]))  # the longest group is one segment
            packed = pack_groups(tokens, row, self.recipe.pad_id, lm_weighting="none")
            real = packed.num_real_tokens
            # compiled flex meets one kernel per row length: powers of two keep those few (batch_invariant's rule)
            width = max(1024, 1 << (real - 1).bit_length()) if self.model.attention_backend == "flex" else None
            packed = flatten_rows(packed, self.recipe.pad_id, multiple=64 if width is None else 1, width=width)
            batch = packed.to_torch(self.device)
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                hidden = self.model(batch.input_ids, batch.position_ids, attention_inputs(batch))
            rewards = fp32_rewards(hidden.reshape(-1, hidden.shape[-1])[batch.response_index], self.model.score.weight)
            out[[i for _, owned in chunk for i, _ in owned]] = rewards.double().cpu().numpy()
            bar.update(len(batch.response_index))
            start = stop
        bar.close()
        return out

    def _truncate(self, prompt: list[int], response: list[int]):
        # The preprocessing policy (megapmp.data.preprocess.fit_pair) for one response.
        eos = self.recipe.eos_id if self.recipe.eos_policy == "response" else None
        prompt, response, _, _ = fit_pair(list(prompt), list(response), list(response), self.max_length, eos)
        return prompt, response


def _cut_group(prompt: list[int], owned: list[tuple[int, list[int]]], budget: int) -> list:
    """A prompt's responses as sub-groups of at most ``budget`` tokens each (prompt included), responses in
    order; a response that alone overflows the budget gets a sub-group of its own."""
    out, current, used = [], [], len(prompt)
    for i, response in owned:
        if current and used + len(response) > budget:
            out.append((prompt, current))
            current, used = [], len(prompt)
        current.append((i, response))
        used += len(response)
    if current:
        out.append((prompt, current))
    return out


# ---------------------------------------------------------------------------------------------------
# loading helpers


def _encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    texts = list(texts)
    if not texts:
        return []
    if hasattr(tokenizer, "encode_batch"):
        return [list(ids) for ids in tokenizer.encode_batch(texts)]
    return [list(tokenizer.encode(t)) for t in texts]


def build_scoring_model(config, state_dict: dict, *, dtype: str | None = None, source: str = ""):
    """A Qwen2RewardModel without LM head holding ``state_dict`` (megapmp keys), built without a
    random init (meta device, then the tensors assigned)."""
    if "score.weight" not in state_dict:
        raise ConvertError(f"{source}: no reward head (score.weight): a language model, not a reward model")
    state = {k: v for k, v in state_dict.items() if k != "lm_head.weight" and v is not None}
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConvertError(f"dtype {dtype!r} is not float32, bfloat16 or float16")
        target = getattr(torch, dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = Qwen2RewardModel(config, with_lm_head=False)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConvertError(f"{source}: the weights do not fit the model config: {e}") from None
    model.rotary.inv_freq = model.rotary._inv_freq(device="cpu")  # non-persistent: rebuilt, fp32
    return model
