#!/usr/bin/env python
"""Print a training layout and its per-rank memory estimate (megapmp.parallel.memory).

    python tools/estimate_memory.py --config examples/configs/pmp_7b.toml --world-size 32 [--section.key value ...]

The launch scripts (examples/_launch.sh) run it with their whole trainer command line before they start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.config import ConfigError, load_train_config, parse_overrides  # noqa: E402
from megapmp.parallel.memory import estimate_memory, format_estimate  # noqa: E402

# Qwen2's vocabulary: the estimate for a config that takes its vocabulary from the shards (vocab_size = 0).
DEFAULT_VOCAB = 151936


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/estimate_memory.py",
                                     description="Print a training layout and its per-rank memory estimate.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, default=None, help="default: tp x pp")
    args, rest = parser.parse_known_args(argv)
    # The launch scripts pass their whole trainer command line; --run-dir is not a config key.
    try:
        overrides = [(k, v) for k, v in parse_overrides(rest) if k != "run_dir"]
    except ConfigError as e:
        parser.error(str(e))
    cfg = load_train_config(args.config, overrides)
    if cfg.model.vocab_size == 0:
        print(f"note: model.vocab_size = 0 (the shards' vocabulary); estimating with {DEFAULT_VOCAB}", file=sys.stderr)
        cfg.model.vocab_size = DEFAULT_VOCAB
    precision = "bf16" if cfg.precision == "auto" else cfg.precision
    est = estimate_memory(cfg.model, cfg.parallel, cfg.data, precision, world_size=args.world_size,
                          activation_checkpointing=cfg.activation_checkpointing, lm_chunk=cfg.loss.lm_chunk,
                          init_from=bool(cfg.checkpoint.init_from))
    print(format_estimate(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
