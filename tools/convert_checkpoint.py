#!/usr/bin/env python
"""Convert megapmp checkpoints to and from Hugging Face Qwen2 directories, and check that they agree.

  to-hf    a megapmp checkpoint -> a Qwen2ForSequenceClassification directory (one label, `score` head)
           (single-process or sharded by a parallel run of any TP/PP/DP layout: gathered to full tensors)
           that transformers, vLLM or any HF stack loads, with the training tokenizer and a
           megapmp_scoring.json saying how to build inputs so that its scores equal ours.
  from-hf  a Qwen2ForCausalLM or Qwen2ForSequenceClassification directory -> a megapmp checkpoint
           directory usable as the trainer's checkpoint.init_from.
  verify   score the same pairs with a megapmp checkpoint and with its HF export (loaded by
           transformers alone) and compare the token ids and the scores.

An export holds:
  config.json             Qwen2Config: architectures [Qwen2ForSequenceClassification], num_labels 1,
                          pad_token_id = the tokenizer's pad (never the EOS the reward is read at)
  model.safetensors       model.* and score.weight (and lm_head.weight with --with-lm-head)
  lm_head.safetensors     an untied model's LM head, for Qwen2ForCausalLM use (absent when tied:
                          the LM head is model.embed_tokens.weight; or with --with-lm-head)
  tokenizer/              the training tokenizer as an HF fast tokenizer (tokenizer.json,
                          tokenizer_config.json) giving the same ids as ours, for byte, BPE/HF and
                          tiktoken tokenizers (a SentencePiece model is copied as is); AutoTokenizer
                          loads it as written
  tokenizer.json, tokenizer_config.json
                          the same files at the top level, only where AutoTokenizer.from_pretrained(DIR)
                          gives our ids from there: transformers >= 5 rebuilds the tokenizer of a qwen2
                          directory as Qwen2Tokenizer (NFC, Qwen2's pre-tokenizer), exact only for
                          tokenizers built that way
  megapmp_scoring.json    template, EOS policy, eos/pad ids, the recipe for input ids and where to load
                          the tokenizer from ("tokenizer": {"path": "." or "tokenizer"})

Scoring recipe (also in megapmp_scoring.json): ids = tokenize(template with "{prompt}" replaced by
the prompt) + tokenize(response) + [eos_token_id], the two texts tokenized separately and without
special tokens; the reward is the score at the last token (the EOS). Batches are right-padded with
pad_token_id: Qwen2ForSequenceClassification pools the last token that is not pad.

Everything is written into a temporary directory beside the output and renamed when complete.
Exit codes: 0 success; 1 a refused input or output, or (verify) a mismatch; 2 usage.

Examples:
  python tools/convert_checkpoint.py to-hf --input runs/pmp --output exports/pmp-hf
  python tools/convert_checkpoint.py to-hf --input runs/pmp/checkpoints/step_00001000 --output out \\
      --dtype bfloat16 --with-lm-head
  python tools/convert_checkpoint.py from-hf --input /models/Qwen2-0.5B --output ckpt/qwen2-0.5b
  python tools/convert_checkpoint.py verify --checkpoint runs/pmp --hf exports/pmp-hf --pairs pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.convert.export import DTYPES, export_to_hf, import_from_hf, verify_export
from megapmp.convert.source import ConvertError
from megapmp.io import get_logger


log = get_logger("convert_checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-hf,from-hf,verify}")

    data_help = dict(
        shard=("take the tokenizer, template and EOS policy from this shard prefix (made like the training "
               "data; checked against trainer.json) instead of the training shards recorded in trainer.json"),
        tokenizer=("load the training tokenizer from this spec or directory (e.g. a moved PREFIX.tokenizer/); "
                   "it must match the identity recorded with the training data"),
    )

    to_hf = sub.add_parser("to-hf", help="megapmp checkpoint -> HF Qwen2ForSequenceClassification directory",
                           description="Export a megapmp checkpoint as an HF Qwen2ForSequenceClassification "
                                       "directory whose scores equal megapmp's rewards.")
    to_hf.add_argument("--input", required=True, metavar="CKPT",
                       help="a checkpoint step directory (step_XXXXXXXX/), or a run or checkpoints directory "
                            "(its newest complete checkpoint is taken)")
    to_hf.add_argument("--output", required=True, metavar="DIR",
                       help="the HF directory to write (refused if it exists, unless --overwrite; never the input "
                            "or a directory holding it)")
    to_hf.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="dtype of the written weights (default float32, the checkpoint's own)")
    to_hf.add_argument("--with-lm-head", action="store_true",
                       help="put an untied model's lm_head.weight into model.safetensors, so the directory also "
                            "loads as Qwen2ForCausalLM (the sequence classifier then reports it as an unexpected "
                            "key); default: write it to lm_head.safetensors. A tied model needs neither")
    to_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    to_hf.add_argument("--shard", default=None, metavar="PREFIX", help=data_help["shard"])
    to_hf.add_argument("--tokenizer", default=None, metavar="SPEC", help=data_help["tokenizer"])

    from_hf = sub.add_parser("from-hf", help="HF Qwen2 directory -> megapmp checkpoint (for checkpoint.init_from)",
                             description="Import an HF Qwen2ForCausalLM or Qwen2ForSequenceClassification "
                                         "directory as a megapmp checkpoint directory (model.safetensors + "
                                         "trainer.json) that the trainer takes as checkpoint.init_from.")
    from_hf.add_argument("--input", required=True, metavar="DIR",
                         help="HF directory: config.json and model.safetensors (sharded safetensors and "
                              "pytorch_model.bin are read too, the latter without unpickling objects); an "
                              "lm_head.safetensors beside them (from to-hf) supplies an untied LM head")
    from_hf.add_argument("--output", required=True, metavar="CKPT",
                         help="the checkpoint directory to write: model.safetensors, trainer.json (model config, "
                              "whether the reward head was present), tokenizer/ and megapmp_scoring.json when the "
                              "HF directory has them")
    from_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    check = sub.add_parser("verify", help="compare a checkpoint's and its HF export's ids and scores",
                           description="Score text pairs with a megapmp checkpoint and with its HF export "
                                       "(transformers AutoTokenizer + AutoModelForSequenceClassification and "
                                       "megapmp_scoring.json only); exit 1 if ids differ or scores differ by "
                                       "more than --atol.")
    check.add_argument("--checkpoint", required=True, metavar="CKPT", help="as to-hf --input")
    check.add_argument("--hf", required=True, metavar="DIR", help="the HF directory written by to-hf")
    check.add_argument("--pairs", default=None, metavar="FILE",
                       help="JSONL of {prompt, chosen, rejected} text pairs (default: a few built-in code pairs)")
    check.add_argument("--limit", type=int, default=8, metavar="N", help="score at most N pairs (default 8)")
    check.add_argument("--atol", type=float, default=1e-4,
                       help="largest allowed |score difference| (default 1e-4; weights are compared at the "
                            "export's dtype)")
    check.add_argument("--shard", default=None, metavar="PREFIX", help=data_help["shard"])
    check.add_argument("--tokenizer", default=None, metavar="SPEC", help=data_help["tokenizer"])
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            result = export_to_hf(args.input, args.output, dtype=args.dtype, with_lm_head=args.with_lm_head,
                                  overwrite=args.overwrite, shard=args.shard, tokenizer_spec=args.tokenizer)
        elif args.command == "from-hf":
            result = import_from_hf(args.input, args.output, overwrite=args.overwrite)
        else:
            if args.limit < 1:
                raise ConvertError(f"--limit {args.limit} must be at least 1")
            result = verify_export(args.checkpoint, args.hf, pairs_file=args.pairs, limit=args.limit,
                                   atol=args.atol, shard=args.shard, tokenizer_spec=args.tokenizer)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for warning in result.get("warnings", []):
        log(f"warning: {warning}")
    for note in result.get("notes", []):
        log(f"note: {note}")
    print(json.dumps(result))
    if args.command == "verify" and not result["ok"]:
        print(f"error: the export does not match: {result['id_mismatches']} id mismatches, max |score "
              f"difference| {result['max_abs_diff']:.3g} > {result['atol']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
