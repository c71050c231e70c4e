"""The flags that choose how a model source is loaded and scored, shared by tools/evaluate.py and
tools/serve_rm.py: one set of names, meanings and help texts, mapped to RewardScorer.load in one place."""

from __future__ import annotations

import argparse


def add_scorer_arguments(group) -> None:
    """--device, --precision, --dtype and the recipe overrides (--tokenizer, --template, --eos-policy,
    --max-length) on ``group`` (a parser or an argument group)."""
    group.add_argument("--device", default=None,
                       help="torch device: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="autocast precision of the forward pass (auto: bf16 on GPUs, fp32 on CPUs); the reward "
                            "head is always computed in fp32")
    group.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="cast the weights to this dtype when loading (default: as stored)")
    group.add_argument("--tokenizer", default=None, metavar="SPEC",
                       help="tokenizer spec or directory to use instead of the recorded one (e.g. a moved "
                            "PREFIX.tokenizer/); for a megapmp checkpoint it must have the recorded identity")
    group.add_argument("--template", default=None, metavar="none|codepmp|FILE",
                       help="prompt template replacing the model's recorded one (a file must contain {prompt})")
    group.add_argument("--eos-policy", default=None, choices=("response", "none"),
                       help="append EOS to each response and read the reward there (response), or read it at the "
                            "response's last token (none); default: the model's recorded policy (an HF directory "
                            "without megapmp_scoring.json: none)")
    group.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                       help="cut prompt + response to this many tokens (prompt from the left, response from the "
                            "right keeping EOS); default: the model's max_position_embeddings")


def scorer_kwargs(args: argparse.Namespace) -> dict:
    """The RewardScorer.load keywords those flags set."""
    return dict(tokenizer=args.tokenizer, template=args.template, eos_policy=args.eos_policy, dtype=args.dtype,
                device=args.device, precision=args.precision, max_length=args.max_length)
