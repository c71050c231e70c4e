"""Qwen2 decoder with an LM head and a scalar reward head, plain single-device PyTorch.

Shape legend: R rows, S tokens per row, H hidden size, V vocabulary, D head dim.
Parallelism is applied from outside by module name, so the names below are an interface:
``embed_tokens``, ``layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``norm``, ``lm_head``, ``score``.
Projections reshape with ``-1`` heads so a tensor-parallel shard (fewer local heads) runs unchanged.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megapmp.config import ModelConfig
from megapmp.model.attention import ATTENTION_BACKENDS, AttentionInputs, attention, prepare_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mean square in fp32 (bf16 loses it); weight applied in the input dtype, as HF does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for explicit position ids (HF's rotate_half layout: halves, not pairs)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Non-persistent: derived from the config, so checkpoints never carry it and
        # meta-device construction rebuilds it in reset_parameters().
        self.register_buffer("inv_freq", self._inv_freq(device=None), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)  # [D/2]

    def reset_parameters(self) -> None:
        self.inv_freq = self._inv_freq(device=self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [R, S, D/2], fp32 like HF
        angles = torch.cat((freqs, freqs), dim=-1)  # [R, S, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [R, S, heads, D]; cos, sin: [R, S, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


# Backends whose Python builds and caches per-batch plans (bucket lists, varlen index tensors, dense masks)
# would make dynamo guard on every batch's structure and recompile; inside a compiled layer they run eager,
# between two compiled graphs. FlexAttention is traced into the layer's graph (its block mask is built once
# per micro-batch before the layers run).
_TRACEABLE_BACKENDS = frozenset({"flex"})


@torch.compiler.disable
def _eager_attention(q, k, v, attn: AttentionInputs, backend: str) -> torch.Tensor:
    return attention(q, k, v, attn, backend=backend)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.head_dim = config.head_dim
        self.backend = backend
        hidden, kv_width = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_width, bias=True)
        self.v_proj = nn.Linear(hidden, kv_width, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionInputs):
        rows, seq_len, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x).view(rows, seq_len, -1, self.head_dim)  # [R, S, n_heads, D]
        k = self.k_proj(x).view(rows, seq_len, -1, self.head_dim)  # [R, S, n_kv_heads, D]
        v = self.v_proj(x).view(rows, seq_len, -1, self.head_dim)  # [R, S, n_kv_heads, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        run = attention if self.backend in _TRACEABLE_BACKENDS else _eager_attention
        out = run(q, k, v, attn, backend=self.backend)  # [R, S, n_heads, D]
        return self.o_proj(out.reshape(rows, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention_backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, attention_backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionInputs):
        h = h + self.self_attn(self.input_layernorm(h), rope, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


def run_layer(layer: DecoderLayer, h: torch.Tensor, rope, attn: AttentionInputs) -> torch.Tensor:
    """One decoder layer's forward, as a function of the layer: megapmp.model.compile compiles THIS, so one
    graph (per input shape) serves every layer, the parameters being its inputs."""
    return layer(h, rope, attn)


class Qwen2RewardModel(nn.Module):
    """Qwen2 decoder returning final-normed hidden states; ``lm_logits`` and ``rewards`` map them
    to token logits and fp32 scalar rewards.

    A pipeline stage keeps only its part: ``layer_ids`` selects decoder layers (names stay
    ``layers.{i}``), and the ``with_*`` flags drop the embedding, the final norm and the heads.
    Setting ``model.embed_tokens = None`` (etc.) or deleting ``model.layers[str(i)]`` after
    construction works the same way.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        activation_checkpointing: bool = False,
        attention_backend: str = "sdpa",
        layer_ids: Iterable[int] | None = None,
        with_embedding: bool = True,
        with_final_norm: bool = True,
        with_lm_head: bool = True,
        with_score: bool = True,
    ):
        super().__init__()
        config.validate()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; known: {sorted(ATTENTION_BACKENDS)}")
        layer_ids = range(config.num_hidden_layers) if layer_ids is None else sorted(set(layer_ids))
        if any(not 0 <= i < config.num_hidden_layers for i in layer_ids):
            raise ValueError(f"layer_ids {list(layer_ids)} outside 0..{config.num_hidden_layers - 1}")

        self.config = config
        self.attention_backend = attention_backend
        self.run_layer = run_layer  # megapmp.model.compile.compile_layers swaps in the compiled one
        self.activation_checkpointing = activation_checkpointing
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if with_embedding else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, attention_backend) for i in layer_ids})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if with_final_norm else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if with_lm_head else None
        self.score = nn.Linear(config.hidden_size, 1, bias=False) if with_score else None
        self.tie_weights()

    def set_attention_backend(self, name: str) -> None:
        """Switch every layer's attention, and what forward prepares for, to backend ``name`` (the model holds
        the one answer: layers and the per-batch preparation never disagree)."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; known: {sorted(ATTENTION_BACKENDS)}")
        self.attention_backend = name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = name

    def tie_weights(self) -> None:
        """Point ``lm_head.weight`` at ``embed_tokens.weight`` when the config ties them.

        ``to_empty()`` replaces each parameter separately and so unties them; ``init_weights``
        re-ties. A stage holding only one of the two is tied by the pipeline code instead.
        """
        if self.config.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF Qwen2 init: Linear/Embedding weights ~ N(0, initializer_range), zero biases,
        unit norm weights; also rebuilds the RoPE table (needed after meta-device construction)."""
        self.tie_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        """input_ids: long [R, S] (or, in a stage without embedding, hidden states [R, S, H]);
        position_ids: long [R, S]. Returns hidden states [R, S, H], final-normed if this model has
        the final norm. Logits are not computed here: the loss does that in chunks."""
        h = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids  # [R, S, H]
        rope = self.rotary(position_ids, h.dtype)  # once per forward, shared by every layer
        # The block mask / varlen plan of this micro-batch, built once and eagerly: the layers (compiled or
        # not, recomputed under activation checkpointing) only read it.
        device_type = h.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        prepare_attention(attn, self.attention_backend, h.device, compute_dtype)
        for layer in self.layers.values():
            if self.activation_checkpointing and self.training:
                h = checkpoint(self.run_layer, layer, h, rope, attn, use_reentrant=False)
            else:
                h = self.run_layer(layer, h, rope, attn)
        return self.norm(h) if self.norm is not None else h

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] in the model dtype."""
        return self.lm_head(hidden)

    def rewards(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> fp32 [...]: the score head computed in fp32 whatever the model dtype."""
        # Autocast would otherwise run this linear in bf16: the reward margin is a small difference
        # of two large dot products, the one place where that rounding shows in the loss.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.score.weight.float()).squeeze(-1)
