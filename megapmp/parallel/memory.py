"""Per-rank memory estimate of a training layout (printed by the launch scripts before they start).

    python tools/estimate_memory.py --config examples/configs/pmp_7b.toml --world-size 32 [--section.key value ...]

What this trainer keeps per rank (the busiest pipeline stage; TP divides every sharded tensor):

  parameters   fp32 (bf16 autocast computes in bf16 but the weights stay fp32)       4 B / parameter
  gradients    fp32                                                                   4 B / parameter
  optimizer    AdamW moments, fp32: 8 B / parameter; ZeRO-1 (parallel.distributed_optimizer): an fp32
               master copy and both moments, sharded over DP: 12 B / parameter / DP
  activations  saved for backward, per token per decoder layer (bf16: 2 B per element, fp32: 4 B):
               4 h  residual-stream tensors (norm inputs/outputs; / TP under sequence parallelism)
               + (2 h + 2 kv*head_dim + 4 I) / TP inside the TP regions (q/k/v, attention output,
               gate/up, silu, product); SDPA/flash attention keeps no S x S scores.
               With activation checkpointing only each layer's input (h, / TP under SP) plus one
               layer's full set. Tokens per micro-batch: an upper bound, every pair filling its row
               (pairs per micro-batch x seq_len). 1F1B keeps min(pp, micro_batches) micro-batches in
               flight on the first stage; AFAB keeps all of them.
  loss         the chunked LM head on a GPU (the triton backend, gradients made in forward): one bf16 logits
               chunk of lm_chunk x vocab/TP (0: 8192 rows), overwritten in place by its gradient, plus the
               fp32 accumulator of the LM head's gradient, vocab/TP x h.

Not counted: the CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, DP gradient buckets
(parallel.bucket_mb, transient). Start-up stages the full model once per rank (on the host when
checkpoint.init_from is set, else on the device), reported as `staging`.
"""
from __future__ import annotations

import math

from megapmp_kernels.pair_loss import GRAD_IN_FORWARD_CHUNK_TOKENS

GiB = 2**30


def parameter_counts(model) -> dict:
    """Exact parameter counts of megapmp's Qwen2RewardModel for a ModelConfig."""
    h, i, v = model.hidden_size, model.intermediate_size, model.vocab_size
    kv = model.num_key_value_heads * model.head_dim
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o (no bias)
    layer = attention + 3 * h * i + 2 * h  # SwiGLU MLP, two RMSNorms
    embedding = v * h
    lm_head = 0 if model.tie_word_embeddings else v * h
    head = h + lm_head + h  # final norm, LM head (untied), score
    total = embedding + model.num_hidden_layers * layer + head
    return {"embedding": embedding, "layer": layer, "lm_head": lm_head, "final_norm_and_score": 2 * h,
            "total": total}


def estimate_memory(model, parallel, data, precision: str = "bf16", *, world_size: int | None = None,
                    activation_checkpointing: bool = False, lm_chunk: int = 0, init_from: bool = False) -> dict:
    """Bytes per rank on the busiest pipeline stage, by category (see the module docstring).

    model: ModelConfig; parallel: ParallelConfig; data: DataConfig; precision: fp32 | bf16 | fp16 | auto
    (auto: bf16, the GPU default). world_size defaults to tp x pp (one data-parallel replica)."""
    tp, pp, vpp = parallel.tp, parallel.pp, getattr(parallel, "vpp", 1)
    world = world_size or tp * pp
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp={tp} x pp={pp}")
    dp = world // (tp * pp)
    counts = parameter_counts(model)
    layers = model.num_hidden_layers
    per_stage_layers = math.ceil(layers / (pp * vpp)) * vpp  # earlier stages take the remainder
    first = per_stage_layers * counts["layer"] + counts["embedding"]
    last = per_stage_layers * counts["layer"] + counts["lm_head"] + counts["final_norm_and_score"]
    if pp == 1:
        stage_params = layers * counts["layer"] + counts["embedding"] + counts["lm_head"] + counts["final_norm_and_score"]
    else:
        # a tied LM head is a second copy of the embedding on the last stage
        last += counts["embedding"] if model.tie_word_embeddings else 0
        stage_params = max(first, last)
    rank_params = stage_params / tp  # norms and the score head are replicated, negligible

    act_bytes = 4 if precision == "fp32" else 2
    h, i = model.hidden_size, model.intermediate_size
    kv = model.num_key_value_heads * model.head_dim
    sp = parallel.sequence_parallel and tp > 1
    residual = 4 * h / (tp if sp else 1)
    inside = (2 * h + 2 * kv + 4 * i) / tp
    per_token_layer = (residual + inside) * act_bytes
    pairs_per_micro = data.items_per_step // (dp * data.micro_batches) if data.items_per_step % (dp * data.micro_batches) == 0 \
        else data.items_per_step / (dp * data.micro_batches)
    tokens_per_micro = pairs_per_micro * data.seq_len
    schedule = getattr(parallel, "schedule", "1f1b")
    in_flight = data.micro_batches if (pp > 1 and schedule == "afab") else min(pp, data.micro_batches)
    if pp == 1:
        in_flight = 1
    if activation_checkpointing:
        saved = h / (tp if sp else 1) * act_bytes
        activations = tokens_per_micro * (in_flight * per_stage_layers * saved + per_token_layer)
    else:
        activations = tokens_per_micro * in_flight * per_stage_layers * per_token_layer
    chunk = lm_chunk or GRAD_IN_FORWARD_CHUNK_TOKENS
    loss = chunk * (model.vocab_size / tp) * 2 + (model.vocab_size / tp) * h * 4
    optimizer = 12 * rank_params / dp if parallel.distributed_optimizer else 8 * rank_params
    out = {
        "layout": {"world_size": world, "tp": tp, "pp": pp, "dp": dp, "vpp": vpp, "sequence_parallel": sp,
                   "distributed_optimizer": bool(parallel.distributed_optimizer), "schedule": schedule,
                   "micro_batches": data.micro_batches, "pairs_per_micro_batch": pairs_per_micro,
                   "tokens_per_micro_batch": tokens_per_micro, "layers_per_stage": per_stage_layers},
        "parameters_total": counts["total"],
        "parameters_per_rank": rank_params,
        "bytes": {"parameters": 4 * rank_params, "gradients": 4 * rank_params, "optimizer": optimizer,
                  "activations": activations, "loss": loss},
        "staging": {"where": "host" if init_from else "device", "bytes": 4 * counts["total"]},
    }
    out["bytes"]["total"] = sum(out["bytes"].values())
    return out


def format_estimate(est: dict) -> str:
    lay = est["layout"]
    lines = [f"layout: world {lay['world_size']} = tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}"
             f" (vpp {lay['vpp']}, schedule {lay['schedule']}, sequence parallel {lay['sequence_parallel']},"
             f" distributed optimizer {lay['distributed_optimizer']})",
             f"  model {est['parameters_total'] / 1e9:.2f}B parameters; {est['parameters_per_rank'] / 1e9:.3f}B on the "
             f"busiest rank ({lay['layers_per_stage']} layers/stage)",
             f"  micro-batch: {lay['pairs_per_micro_batch']} pairs, <= {lay['tokens_per_micro_batch']} tokens; "
             f"{lay['micro_batches']} micro-batches per step per DP rank",
             "  per-rank memory estimate:"]
    for key in ("parameters", "gradients", "optimizer", "activations", "loss", "total"):
        lines.append(f"    {key:12s} {est['bytes'][key] / GiB:8.2f} GiB")
    lines.append(f"  start-up staging of the full fp32 model on the {est['staging']['where']}: "
                 f"{est['staging']['bytes'] / GiB:.1f} GiB per rank (transient)")
    return "\n".join(lines)

