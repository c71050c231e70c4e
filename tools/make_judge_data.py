#!/usr/bin/env python
"""Turn preference pairs into a pairwise judge's training shard (CodeFavor's classification judges).

Each pair (prompt = the instruction, chosen = the better code, rejected = the worse one; Critic-Evol,
Commit-Instruct, rules or any pairs JSONL) becomes a judge sample: the judge template filled with the
instruction, the two codes and a criterion, answered by one label token ("A": the first code is better,
"B": the second). With --both-order every pair gives two samples, one per order, so the label carries
no position signal; otherwise one sample per pair, its order drawn from --seed and the pair's id.

The samples are ordinary pairs whose responses are the two labels (chosen = the right label): they are
written to PREFIX.samples.jsonl and tokenized into the shard PREFIX (.bin/.idx/.json/.tokenizer/) like
tools/preprocess_pairs.py does, with EOS policy "none" (one token per response) and the judge format
(template, labels, their token ids) recorded in the sidecar, so a checkpoint trained on it knows it is a
judge. Train with the LM term only, which is then cross-entropy on the label token:

  python -m megapmp.train --config examples/configs/tiny.toml --run-dir runs/judge --data.train PREFIX \\
      --data.layout shared-prefix --loss.rm_coef 0 --loss.lm_coef 1 --checkpoint.init_from runs/lm

Exit codes: 0 success; 2 bad input (a malformed pair: FILE:LINE field 'X'), bad options, an output that
exists (without --overwrite), a label that is not one token.

Examples:
  python tools/make_judge_data.py --input critic_evol.jsonl commits.jsonl --output-prefix data/judge \\
      --both-order --tokenizer data/pmp_train.tokenizer --max-length 2048 --overlong truncate
  python tools/make_judge_data.py --input pairs.jsonl --output-prefix data/judge --template my_template.txt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.data.judge import (DEFAULT_CRITERION, JUDGE_TEMPLATES, JudgeFormat, judge_samples,  # noqa: E402
                                resolve_judge_template)
from megapmp.data.preprocess import build_shard  # noqa: E402
from megapmp.data.shards import OutputError, refuse_existing_output  # noqa: E402
from megapmp.data.indexed import ShardError  # noqa: E402
from megapmp.io import InputError, iter_jsonl, text_field, write_jsonl_atomic  # noqa: E402

PASSTHROUGH = ("method", "repo", "commit", "task_id", "weak_model", "critic_model", "chosen_model", "rejected_model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_judge_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PAIRS.jsonl",
                   help="pairs JSONL(.gz) files, read in the order given (the pairs JSONL of synthesize_pairs.py)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="the judge shard: PREFIX.bin/.idx/.json/.tokenizer/, and the samples in PREFIX.samples.jsonl")
    p.add_argument("--keys", default="prompt,chosen,rejected", metavar="K1,K2,K3",
                   help="field names of instruction, better code, worse code (default prompt,chosen,rejected; "
                        "CodePMP's query,better,worse)")
    p.add_argument("--criteria-key", default="criteria", metavar="KEY",
                   help="field holding a pair's own criterion (Critic-Evol writes one; default criteria); pairs "
                        "without it get --criteria")
    p.add_argument("--criteria", default=DEFAULT_CRITERION, metavar="TEXT",
                   help=f"criterion for pairs that name none (default: {DEFAULT_CRITERION!r})")
    p.add_argument("--template", default="codefavor", metavar=f"{'|'.join(JUDGE_TEMPLATES)}|FILE",
                   help="the judge template: codefavor (CodeFavor's classification prompt structure: [INSTRUCTION], "
                        "[CODE_A], [CODE_B], [CRITERIA], then the question the label answers), or a file with "
                        "{instruction}, {code_a}, {code_b} once each and {criteria} at most once")
    p.add_argument("--labels", default="A,B", metavar="FIRST,SECOND",
                   help="the label meaning 'the first code is better' and the one meaning 'the second is' (default "
                        "A,B); each must be one token of the tokenizer")
    p.add_argument("--both-order", action="store_true",
                   help="two samples per pair, the better code first (label A) and second (label B), as CodeFavor "
                        "trains; without it one sample per pair in a seeded random order")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-order draw (with the pair's id; default 0)")
    p.add_argument("--keep-comments", action="store_true",
                   help="keep comments and docstrings in the codes (default: stripped, as CodeFavor's judges see "
                        "code; its evaluation strips them too, except for the human-preference aspect)")
    tok = p.add_argument_group("tokenization (as tools/preprocess_pairs.py)")
    tok.add_argument("--tokenizer", default="byte", metavar="SPEC",
                     help="byte, bpe:N, or a tokenizer file/directory, e.g. the PREFIX.tokenizer/ of the shards the "
                          "model to finetune was trained on (default byte)")
    tok.add_argument("--max-length", type=int, default=None, metavar="N",
                     help="maximum tokens of a sample (judge prompt + label)")
    tok.add_argument("--overlong", default="error", choices=["error", "truncate"],
                     help="a sample over --max-length: error (stop), or truncate the judge prompt from the left "
                          "(its end, the codes and the question, is kept)")
    tok.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (same output for any N)")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing shard at --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.keys = tuple(args.keys.split(","))
    args.labels = tuple(args.labels.split(","))
    if len(args.keys) != 3:
        p.error(f"--keys needs three names, got {args.keys}")
    if len(args.labels) != 2:
        p.error(f"--labels needs two labels, got {args.labels}")
    return args


def one_order(seed: int, pair_id: str) -> tuple[bool]:
    """The order of a pair's one sample: drawn from (seed, id), so it does not depend on the input's order."""
    return (random.Random(f"{seed}:{pair_id}").random() < 0.5,)


def read_samples(args, fmt: JudgeFormat, stats: dict) -> list[dict]:
    k_prompt, k_chosen, k_rejected = args.keys
    samples = []
    for path in args.input:
        for line_no, record in iter_jsonl(path):
            values = [text_field(str(path), line_no, record, key) for key in (k_prompt, k_chosen, k_rejected)]
            criteria = record.get(args.criteria_key)
            if criteria is not None and (not isinstance(criteria, str) or not criteria.strip()):
                raise InputError(str(path), line_no, args.criteria_key, "not a non-empty string")
            stats["pairs"] += 1
            prompt, chosen, rejected = values
            if fmt.code(chosen) == fmt.code(rejected):  # e.g. the two differ in comments only
                stats["identical_codes"] += 1
                continue
            pair_id = str(record.get("id", f"{Path(path).name}:{line_no}"))
            orders = (True, False) if args.both_order else one_order(args.seed, pair_id)
            stats["with_own_criteria"] += criteria is not None
            for sample in judge_samples(prompt, chosen, rejected, fmt, criteria=criteria, orders=orders):
                position = sample["chosen_position"]
                samples.append({"id": f"{pair_id}:{position}", **sample, "pair_id": pair_id,
                                **{k: record[k] for k in PASSTHROUGH if k in record}})
                stats["chosen_first" if position == 0 else "chosen_second"] += 1
    return samples


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        name, text = resolve_judge_template(args.template)
        fmt = JudgeFormat(template=text, template_name=name, labels=args.labels,
                          strip_comments=not args.keep_comments, default_criterion=args.criteria)
        refuse_existing_output(args.output_prefix, args.overwrite)
        stats = {"pairs": 0, "identical_codes": 0, "with_own_criteria": 0, "chosen_first": 0, "chosen_second": 0}
        samples = read_samples(args, fmt, stats)
        if not samples:
            raise ValueError(f"{', '.join(args.input)}: no judge samples ({stats['pairs']} pairs read)")
        samples_path = f"{args.output_prefix}.samples.jsonl"
        write_jsonl_atomic(samples_path, samples)
        try:
            counts = build_shard([samples_path], args.output_prefix, kind="pairs", tokenizer=args.tokenizer,
                                 template="none", eos_policy="none", max_length=args.max_length,
                                 overlong=args.overlong, workers=args.workers, overwrite=args.overwrite,
                                 judge=fmt.to_meta([]), progress=not args.no_progress)
        except BaseException:
            Path(samples_path).unlink(missing_ok=True)  # no output without its shard
            raise
    except (InputError, OutputError, ShardError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"samples": len(samples), "samples_file": samples_path, **stats, "shard": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
