"""Configuration dataclasses, one per component, with presets and validation.

Each dataclass documents its fields once, here. ``validate()`` raises a single ``ValueError``
that names every offending value, so a bad config is fixed in one edit rather than one
error at a time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A configuration the user must fix (bad value, unknown key, unreadable file); the trainer's CLI
    prints it on one line and exits 2, while other exceptions stay tracebacks."""


def _raise_if_any(component: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid {component}: " + "; ".join(problems))


# The attention implementations megapmp/model/attention.py registers (its ATTENTION_BACKENDS has exactly
# these keys; a test keeps the two equal). Named here so that validating a config needs no model code.
COMPILE_SETTINGS = ("auto", "on", "off")
ATTENTION_BACKEND_NAMES = ("auto", "sdpa", "segmented", "flash_attn", "flex", "torch_varlen", "varlen_reference")
# megapmp/loss.py's LOSS_BACKENDS (a test keeps the two equal), named here for the same reason.
LOSS_BACKEND_NAMES = ("auto", "torch", "triton", "triton_recompute")


@dataclass
class ModelConfig:
    """Qwen2 decoder architecture; field names and meanings are those of HF ``Qwen2Config``."""

    vocab_size: int = 384
    """Rows of the token embedding and of the LM head."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 176
    """Width of the SwiGLU MLP (gate/up output, down input)."""
    num_hidden_layers: int = 2
    """Number of decoder layers."""
    num_attention_heads: int = 4
    """Query heads per layer; ``hidden_size / num_attention_heads`` is the head dimension."""
    num_key_value_heads: int = 2
    """Key/value heads per layer (grouped-query attention); must divide ``num_attention_heads``."""
    max_position_embeddings: int = 4096
    """Longest position the model is meant to see (RoPE itself has no hard limit)."""
    rope_theta: float = 10000.0
    """RoPE base: inverse frequencies are ``rope_theta ** (-2i / head_dim)``."""
    rms_norm_eps: float = 1e-6
    """Epsilon added to the mean square inside every RMSNorm."""
    tie_word_embeddings: bool = True
    """Share one matrix between ``embed_tokens`` and ``lm_head``."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of every Linear and Embedding weight."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tp_problems(self, tp: int) -> list[str]:
        """Why this architecture cannot be split over ``tp`` tensor-parallel ranks; empty if it can. KV heads
        are either split (kv % tp == 0) or replicated (tp % kv == 0): see parallel/tensor_parallel.py."""
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        problems = []
        if heads % tp:
            problems.append(f"num_attention_heads={heads} is not divisible by tp={tp}")
        if kv % tp and tp % kv:
            problems.append(f"num_key_value_heads={kv} (num_attention_heads={heads}) can neither be split over "
                            f"tp={tp} (needs kv % tp == 0) nor replicated (needs tp % kv == 0)")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size} is not divisible by tp={tp}")
        if self.vocab_size % tp:
            problems.append(f"vocab_size={self.vocab_size} is not divisible by tp={tp}: pad it "
                            f"(megapmp.data.tokenizers.padded_vocab_size(vocab, tensor_parallel={tp}))")
        return problems

    def validate(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"{name}={value!r} must be a positive number")
        if not isinstance(self.tie_word_embeddings, bool):
            problems.append(f"tie_word_embeddings={self.tie_word_embeddings!r} must be a bool")

        hidden, heads, kv_heads = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if _positive_ints(hidden, heads):
            if hidden % heads:
                problems.append(
                    f"hidden_size={hidden} is not divisible by num_attention_heads={heads}"
                )
            elif (hidden // heads) % 2:
                # rotate_half pairs dimension i with i + head_dim/2.
                problems.append(
                    f"head_dim={hidden // heads} (hidden_size={hidden} / num_attention_heads={heads}) "
                    "must be even for RoPE"
                )
        if _positive_ints(heads, kv_heads) and heads % kv_heads:
            problems.append(
                f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}"
            )
        _raise_if_any("ModelConfig", problems)


def _positive_ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


# Values of the public config.json of each Hugging Face checkpoint (Qwen/Qwen2-0.5B, -1.5B, -7B).
MODEL_PRESETS: dict[str, ModelConfig] = {
    # Seconds per step on a laptop CPU: for tests, the quickstart and the golden loss curve.
    "tiny": ModelConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.02,
    ),
    "qwen2-0.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.02,
    ),
    "qwen2-1.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.02,
    ),
    "qwen2-7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
    ),
}


def model_preset(name: str) -> ModelConfig:
    """A fresh copy of the preset ``name`` (editing it leaves ``MODEL_PRESETS`` untouched)."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name])


@dataclass
class LossConfig:
    """The PMP objective: rm_coef * pairwise ranking loss + lm_coef * chosen-response LM loss."""

    rm_coef: float = 1.0
    """Weight of -log sigmoid(r_chosen - r_rejected); 0 for LM pretraining."""
    lm_coef: float = 1.0
    """Weight of the next-token CE on chosen-response tokens; 0 for RM finetuning."""
    lm_chunk: int = 0
    """Target tokens whose logits are materialised at once (bounds the loss's extra memory); 0: the
    backend's default (4096 for torch; 8192 for triton, whose larger GEMMs measured 6% faster on an H200)."""
    backend: str = "auto"
    """Implementation of megapmp_kernels.fused_pair_loss: "torch" (chunked, any device), "triton"
    (gradients made in forward: cuBLAS GEMMs around Triton row kernels; CUDA, or CPU under
    TRITON_INTERPRET=1), "triton_recompute" (tiled Triton kernels, logits recomputed in backward: least
    memory, slower) or "auto" (triton on CUDA when importable, else torch).
    $MEGAPMP_LOSS_BACKEND, when set, overrides this at start (and config.json records the override)."""

    def validate(self) -> None:
        problems = []
        if self.backend not in LOSS_BACKEND_NAMES:
            problems.append(f"backend={self.backend!r} must be one of {', '.join(LOSS_BACKEND_NAMES)}")
        if self.rm_coef < 0 or self.lm_coef < 0:
            problems.append(f"rm_coef={self.rm_coef} and lm_coef={self.lm_coef} must be >= 0")
        if self.rm_coef == 0 and self.lm_coef == 0:
            problems.append("rm_coef and lm_coef are both 0: nothing to train")
        if self.lm_chunk < 0:
            problems.append(f"lm_chunk={self.lm_chunk} must be >= 0 (0: the backend's default)")
        _raise_if_any("LossConfig", problems)


@dataclass
class OptimizerConfig:
    """AdamW (apex FusedAdam or torch's fused AdamW on GPUs when available)."""

    lr: float = 3e-4
    """Peak learning rate (CodePMP 7B: 1e-6 on top of a pretrained Qwen2)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; biases and norm weights are not decayed."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping (the norm is still logged)."""
    backend: str = "auto"
    """auto | torch | torch-fused | apex."""

    def validate(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be positive")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip < 0:
            problems.append(f"grad_clip={self.grad_clip} must be >= 0")
        if self.backend not in ("auto", "torch", "torch-fused", "apex"):
            problems.append(f"backend={self.backend!r} is not auto, torch, torch-fused or apex")
        _raise_if_any("OptimizerConfig", problems)


SCHEDULE_NAMES = ("wsd", "wcd", "cosine", "constant")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over the run's `steps` optimizer steps (see megapmp.optim.lr_at)."""

    name: str = "wsd"
    """wsd (warmup-stable-decay: the paper's PMP schedule), wcd (warmup-cosine-decay, linear warmup then a
    cosine decay over the rest of the run: the paper's RM-finetuning schedule; Table 3, section 5.3),
    cosine (the same as wcd, its older name here), or constant."""
    warmup_fraction: float = 0.03
    """Fraction of the run spent in linear warmup."""
    decay_fraction: float = 0.1
    """wsd only: fraction of the run, at its end, spent in cosine decay (wcd decays over all the steps after
    warmup; Table 3 gives no decay ratio for it, so its configs set 0)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""

    def validate(self) -> None:
        problems = []
        if self.name not in SCHEDULE_NAMES:
            problems.append(f"name={self.name!r} is not one of {', '.join(SCHEDULE_NAMES)}")
        for name in ("warmup_fraction", "decay_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.warmup_fraction + (self.decay_fraction if self.name == "wsd" else 0) > 1:
            problems.append(f"warmup_fraction + decay_fraction = {self.warmup_fraction + self.decay_fraction} exceeds 1")
        _raise_if_any("ScheduleConfig", problems)


@dataclass
class DataConfig:
    """Which shards, and how they become optimizer steps."""

    train: list = field(default_factory=list)
    """Shard prefixes (made by tools/preprocess_pairs.py) blended into the training stream."""
    weights: list | None = None
    """Blend weights, one per train shard; default equal."""
    valid: list = field(default_factory=list)
    """Held-out pair shards for the periodic RM accuracy."""
    valid_items: int = 512
    """At most this many held-out pairs are scored."""
    kind: str = "pairs"
    """pairs (PMP, RM finetuning) or documents (LM pretraining)."""
    layout: str = "duplicated"
    """Pair packing: duplicated [P C][P R] or shared-prefix [P C R]; or group [P R1 ... RK]: a shard of
    response groups (tools/preprocess_pairs.py --groups) packed one group per segment, every labelled pair
    of it in the loss (a pair shard packs as [P C R]). Pair layouts train group shards as their pairs expanded."""
    lm_weighting: str = "distinct"
    """LM term of a group (layout group): distinct = each response that wins a labelled pair once; pairs =
    once per pair it wins, which is what the same pairs expanded train (the pair layouts always do)."""
    seq_len: int = 2048
    """Tokens per packed row; a pair must fit in one row."""
    max_length: int = 0
    """The longest prompt + response (tokens) the recipe allows (Table 3: 1024): every train and valid shard
    must have been preprocessed with --max-length at most this, and seq_len must hold a pair of two such
    sequences (2 x max_length). 0: no check."""
    packing: str = "flat"
    """flat: each micro-batch becomes one [1, T] row of its real tokens (no row-end padding; for the
    varlen attention backends: segmented, torch_varlen, flash_attn, auto); rows: [R, seq_len] rows as
    first-fit left them (what the dense-mask sdpa backend needs)."""
    items_per_step: int = 32
    """Global batch: pairs (or document windows) per optimizer step, over all data-parallel ranks."""
    micro_batches: int = 1
    """Gradient-accumulation micro-batches per step on each data-parallel rank."""
    seed: int = 1234
    """Shuffling seed; the order is a pure function of (seed, epoch)."""
    bucket_tokens: int = 0
    """With packing=flat and no token budget (micro_batch_tokens), pad each micro-batch's row to a multiple
    of this many tokens (one compile per bucket a run visits). 0: 256 when the run compiles per shape, else 1
    (no padding beyond the TP multiple). Setting it turns the automatic token budget off."""
    micro_batch_tokens: int = 0
    """With packing=flat: every micro-batch is exactly this many tokens, its pairs chosen by their lengths
    (even totals; a step gets more than micro_batches micro-batches only when its pairs do not fit), so a
    compiled model sees ONE shape for the whole run (compile once, not once per length). 0: automatic -- when
    the run compiles per shape (TrainConfig.compile, or FlexAttention on CUDA) and bucket_tokens is 0, the
    budget that minimises the expected padded tokens per step on these shards, else none; -1: none."""
    prefetch_steps: int = 1
    """Steps packed ahead on a background thread while the device computes (0: pack on the main thread)."""
    verify: str = "open"
    """Shard checks before training. open: the cheap checks at open (index and file sizes, the sidecar's
    counts), plus every token id checked against the vocabulary as it is read; full: also each train and
    valid shard's sha256 against its sidecar, reading every byte once before the first step."""
    overlong: str = "error"
    """A pair longer than a row (2P + C + R tokens duplicated, P + C + R shared-prefix, over seq_len), found
    from the shards' index at open: error (refuse to start, naming the shard, the count and the longest) or
    drop (leave such pairs out of training and held-out scoring, counted in the log). To cut them instead,
    preprocess again with --max-length seq_len/2 --overlong truncate."""

    def validate(self) -> None:
        problems = []
        if not self.train:
            problems.append("train lists no shard prefix (set data.train in the config or pass --data.train PREFIX)")
        if self.verify not in ("open", "full"):
            problems.append(f"verify={self.verify!r} is not open or full")
        if self.weights is not None and len(self.weights) != len(self.train):
            problems.append(f"weights has {len(self.weights)} entries for {len(self.train)} train shards")
        if self.kind not in ("pairs", "documents"):
            problems.append(f"kind={self.kind!r} is not pairs or documents")
        if self.layout not in ("duplicated", "shared-prefix", "group"):
            problems.append(f"layout={self.layout!r} is not duplicated, shared-prefix or group")
        if self.lm_weighting not in ("distinct", "pairs"):  # megapmp.data.groups.LM_WEIGHTINGS
            problems.append(f"lm_weighting={self.lm_weighting!r} is not distinct or pairs")
        if self.packing not in ("flat", "rows"):
            problems.append(f"packing={self.packing!r} is not flat or rows")
        if self.overlong not in ("error", "drop"):
            problems.append(f"overlong={self.overlong!r} is not error or drop")
        if self.prefetch_steps < 0:
            problems.append(f"prefetch_steps={self.prefetch_steps} must be >= 0")
        if self.bucket_tokens < 0:
            problems.append(f"bucket_tokens={self.bucket_tokens} must be >= 0 (0: automatic)")
        if self.max_length < 0:
            problems.append(f"max_length={self.max_length} must be >= 0 (0: no check)")
        elif self.max_length and self.seq_len < 2 * self.max_length:
            problems.append(f"seq_len={self.seq_len} cannot hold a pair of two {self.max_length}-token sequences "
                            f"(max_length): it must be at least {2 * self.max_length}")
        if self.micro_batch_tokens < -1:
            problems.append(f"micro_batch_tokens={self.micro_batch_tokens} must be >= -1 (0: automatic, -1: none)")
        if self.micro_batch_tokens > 0 and self.packing != "flat":
            problems.append(f"micro_batch_tokens={self.micro_batch_tokens} needs packing=flat, not {self.packing!r}")
        for name in ("seq_len", "items_per_step", "micro_batches", "valid_items"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.items_per_step % max(1, self.micro_batches):
            problems.append(f"items_per_step={self.items_per_step} is not divisible by micro_batches={self.micro_batches}")
        _raise_if_any("DataConfig", problems)


@dataclass
class CheckpointConfig:
    """Saving, resuming and initialising."""

    interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Keep only the newest this many checkpoints (0: keep all)."""
    resume: str = "auto"
    """auto: continue from the run's newest complete checkpoint if there is one; none; or a path."""
    init_from: str | None = None
    """Initial weights: a megapmp run / checkpoint directory or an HF Qwen2 directory (weights only)."""
    init_reward_head: bool = True
    """Also take the reward head from init_from (false: a fresh head, e.g. LM -> PMP)."""
    allow_change: list = field(default_factory=list)
    """Settings (dotted keys, e.g. optimizer.lr data.seq_len) that may differ from the resumed checkpoint's.
    Resuming refuses any other change to a setting that changes the training curve (data, model, loss,
    optimizer, schedule, steps, seeds, precision); an allowed change is logged and recorded in the first
    metrics.jsonl record after the resume (config_changes). Settings of layout, speed, logging and saving
    may always change (megapmp/run_dir.py says which)."""

    def validate(self) -> None:
        problems = []
        if self.interval < 0 or self.keep_last < 0:
            problems.append(f"interval={self.interval} and keep_last={self.keep_last} must be >= 0")
        _raise_if_any("CheckpointConfig", problems)


@dataclass
class ParallelConfig:
    """Tensor / pipeline / data parallel sizes (the product is the world size)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    sequence_parallel: bool = False
    """Shard norms and residuals along the sequence inside a tensor-parallel group."""
    distributed_optimizer: bool = False
    """ZeRO-1: shard fp32 master weights and Adam states over data-parallel ranks."""
    schedule: str = "1f1b"
    """Pipeline schedule: afab (all-forward-all-backward), 1f1b, or interleaved (needs vpp > 1)."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank, for the interleaved schedule."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient all-reduce with the last micro-batch's backward (bucketed)."""
    bucket_mb: float = 25.0
    """Size of one data-parallel gradient all-reduce bucket, in MiB."""

    def validate(self) -> None:
        problems = [f"{n}={getattr(self, n)} must be >= 1" for n in ("tp", "pp", "vpp") if getattr(self, n) < 1]
        if self.schedule not in ("afab", "1f1b", "interleaved"):
            problems.append(f"schedule={self.schedule!r} is not afab, 1f1b or interleaved")
        if self.vpp > 1 and self.pp == 1:
            problems.append(f"vpp={self.vpp} virtual stages need pp > 1")
        if self.vpp > 1 and self.schedule == "1f1b":
            problems.append(f"vpp={self.vpp} needs schedule = interleaved (or afab); 1f1b runs one chunk per stage")
        if self.schedule == "interleaved" and self.vpp < 2:
            problems.append("schedule=interleaved needs vpp >= 2 model chunks per stage")
        if not self.bucket_mb > 0:
            problems.append(f"bucket_mb={self.bucket_mb} must be positive")
        _raise_if_any("ParallelConfig", problems)


@dataclass
class LoggingConfig:
    """Progress, held-out evaluation and optional experiment trackers."""

    progress: bool = True
    """Show a progress bar on stderr."""
    eval_interval: int = 0
    """Score data.valid every this many steps (0: never; the last step is always scored if > 0)."""
    tensorboard: bool = False
    """Also write TensorBoard events to RUN_DIR/tensorboard (needs the tensorboard package)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs wandb)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s per device for MFU (0: the table in megapmp/flops.py for known GPUs; no MFU on CPU)."""


@dataclass
class TrainConfig:
    """A whole run. Every component gets only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    steps: int = 100
    """Optimizer steps of the run (the schedule spans them). 0: derived from `epochs` and the training data
    at start; a positive value overrides `epochs`."""
    epochs: float = 0.0
    """Passes over the training data (Table 3: 1 everywhere), used when steps = 0: steps =
    floor(epochs x training items / data.items_per_step), where the items are all pairs (or document
    windows) of all data.train shards together, whatever their blend weights. 0: steps must be given."""
    seed: int = 1234
    """Model-initialisation seed."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    attention_backend: str = "auto"
    """Attention implementation over packed rows."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward to save activation memory."""
    compile: str = "auto"
    """Regional torch.compile of each decoder layer (as torchtitan does): on, off, or auto = on when the
    device is CUDA, off on CPU. Compile time is logged per step (compile_s) and left out of tokens/s."""
    max_nonfinite_steps: int = 5
    """Stop when more than this many consecutive steps have non-finite loss or gradients."""
    num_threads: int = 0
    """CPU threads for torch (0: torch's default)."""

    def validate(self) -> None:
        problems = []
        for section in (self.model, self.loss, self.optimizer, self.schedule, self.data, self.checkpoint,
                        self.parallel):
            try:
                section.validate()
            except ValueError as e:
                problems.append(str(e))
        if self.steps < 0 or self.epochs < 0:
            problems.append(f"steps={self.steps} and epochs={self.epochs} must be >= 0")
        elif self.steps == 0 and not self.epochs > 0:
            problems.append("steps=0 and epochs=0: give the run's length as steps, or as epochs over the data")
        if self.attention_backend not in ATTENTION_BACKEND_NAMES:
            problems.append(f"attention_backend={self.attention_backend!r} is not one of "
                            f"{', '.join(sorted(ATTENTION_BACKEND_NAMES))}")
        if self.compile not in COMPILE_SETTINGS:
            problems.append(f"compile={self.compile!r} is not one of {', '.join(COMPILE_SETTINGS)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision={self.precision!r} is not auto, fp32, bf16 or fp16")
        p, d = self.parallel, self.data
        if p.schedule == "interleaved" and p.pp > 1 and d.micro_batches % p.pp:
            problems.append(f"the interleaved schedule needs data.micro_batches={d.micro_batches} divisible by "
                            f"parallel.pp={p.pp}")
        if p.pp * p.vpp > self.model.num_hidden_layers:
            problems.append(f"parallel.pp={p.pp} x vpp={p.vpp} stages exceed model.num_hidden_layers="
                            f"{self.model.num_hidden_layers}")
        if p.tp > 1:
            problems += self.model.tp_problems(p.tp)
        if p.sequence_parallel and p.tp > 1 and d.seq_len % p.tp:
            problems.append(f"sequence parallel needs data.seq_len={d.seq_len} divisible by parallel.tp={p.tp}")
        if self.attention_backend == "sdpa" and d.packing == "flat":
            problems.append("attention_backend=sdpa builds a dense [T, T] mask per row: with data.packing=flat "
                            "that is the whole micro-batch; use data.packing=rows, or a varlen backend")
        if self.data.kind == "documents" and self.loss.rm_coef:
            problems.append("data.kind=documents has no pairs: set loss.rm_coef = 0 for LM pretraining")
        allowed = self.checkpoint.allow_change
        unknown = sorted(set(allowed) - set(config_keys(TrainConfig))) if isinstance(allowed, list) else [repr(allowed)]
        if unknown:
            problems.append(f"checkpoint.allow_change names unknown settings {', '.join(unknown)} (dotted keys such "
                            f"as optimizer.lr or data.seq_len)")
        if problems:
            raise ConfigError("invalid TrainConfig: " + " | ".join(problems))


def config_keys(cls, prefix: str = "") -> list[str]:
    """Every setting of a config dataclass as a dotted key ("data.seq_len", "steps")."""
    keys = []
    for f in fields(cls):
        section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            keys += config_keys(section, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


SECTIONS = {f.name for f in fields(TrainConfig) if f.name in
            ("model", "loss", "optimizer", "schedule", "data", "checkpoint", "parallel", "logging")}


def _convert(raw, current, type_hint: str, key: str):
    """A command-line string (or TOML value) as the type of the field it sets."""
    if not isinstance(raw, str):
        return raw
    hint = type_hint.replace(" ", "")
    if raw.lower() in ("none", "null") and "None" in hint:
        return None
    if hint.startswith("bool") or isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {raw!r}")
    try:
        if hint.startswith("int"):
            return int(raw)
        if hint.startswith("float"):
            return float(raw)
        if hint.startswith("list"):
            items = [x for x in raw.split(",") if x]
            return [float(x) for x in items] if key.endswith("weights") else items
    except ValueError:
        raise ConfigError(f"--{key} expects {hint.split('|')[0]}, got {raw!r}") from None
    return raw


def _apply(obj, key: str, value, full_key: str) -> None:
    names = {f.name: f for f in fields(obj)}
    if key not in names:
        raise ConfigError(f"unknown config key {full_key!r}; {type(obj).__name__} has: {', '.join(sorted(names))}")
    setattr(obj, key, _convert(value, getattr(obj, key), str(names[key].type), full_key))


def build_train_config(table: dict, overrides: list[tuple[str, str]] = ()) -> TrainConfig:
    """A TrainConfig from a TOML-shaped dict plus dotted command-line overrides.

    `[model] preset = "qwen2-1.5b"` starts the model section from that preset; other keys override it.
    """
    cfg = TrainConfig()
    table = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    dotted = list(overrides)
    preset = table.get("model", {}).pop("preset", None)
    for key, value in dotted:
        if key == "model.preset":
            preset = value
    if preset:
        cfg.model = model_preset(preset)
    for section, values in table.items():
        if section in SECTIONS:
            if not isinstance(values, dict):
                raise ConfigError(f"config section [{section}] must be a table")
            for key, value in values.items():
                _apply(getattr(cfg, section), key, value, f"{section}.{key}")
        else:
            _apply(cfg, section, values, section)
    for key, value in dotted:
        if key == "model.preset":
            continue
        section, _, name = key.rpartition(".")
        if section and section not in SECTIONS:
            raise ConfigError(f"unknown config section in {key!r}; sections are: {', '.join(sorted(SECTIONS))}")
        _apply(getattr(cfg, section) if section else cfg, name, value, key)
    return cfg


def load_train_config(path: str | None, overrides: list[tuple[str, str]] = ()) -> TrainConfig:
    table = {}
    if path:
        import tomllib

        if not Path(path).is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return build_train_config(table, overrides)


def parse_overrides(rest: list[str]) -> list[tuple[str, str]]:
    """`--section.key value` or `--section.key=value` tokens as (dotted key, raw value) pairs; a stray token
    is a ConfigError (the command lines in tools/ and train.py report it as a usage error)."""
    overrides = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--") and "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif token.startswith("--") and i + 1 < len(rest):
            key, value = token[2:], rest[i + 1]
            i += 2
        else:
            raise ConfigError(f"overrides come as '--section.key value' pairs; could not read {token!r}")
        overrides.append((key.replace("-", "_"), value))
    return overrides
