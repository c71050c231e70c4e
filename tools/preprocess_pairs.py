#!/usr/bin/env python
"""Tokenize preference pairs, response groups (or plain documents) offline into memory-mapped MMIDIDX shards.

Writes PREFIX.bin + PREFIX.idx (Megatron's MMIDIDX v1 layout, one pair = one document of three
sequences: prompt, chosen response, rejected response), PREFIX.json (tokenizer identity, vocab sizes,
template, policies, counts, sha256 checksums) and PREFIX.tokenizer/ (the tokenizer, so the shard is
self-describing). Everything is written under temporary names and renamed at the end; an existing
shard is never replaced without --overwrite.

With --groups each record is a prompt and all its responses (megapmp/data/groups.py), one document of
1 + K sequences, and PREFIX.labels holds one float64 label per sequence (NaN at the prompt):
  {"prompt": "...", "responses": ["...", ...], "labels": [true, false, ...]}   (or numeric scores, higher
                                                                                is better; ties make no pair)
  {"prompt": "...", "chosen": ["...", ...], "rejected": ["...", ...]}
Train on it with --data.layout group (every labelled pair in the loss, the prompt packed once per row).

Exit codes: 0 success; 2 bad input (a rejected record with --on-error fail, an empty input, a damaged
.gz), bad options or usage, an output that cannot be written or would overwrite, or (verify) a damaged
shard. Every error is one line naming the file (and line and field where there is one).

Examples:
  python tools/preprocess_pairs.py --input pairs.jsonl --output-prefix data/pairs --tokenizer bpe:8192
  python tools/preprocess_pairs.py --input codepmp.jsonl.gz --keys query,better,worse --template codepmp \\
      --tokenizer /models/Qwen2-7B --max-length 1024 --overlong truncate --workers 16
  python tools/preprocess_pairs.py --groups --input mathshepherd_groups.jsonl --output-prefix data/ms_groups
  python tools/preprocess_pairs.py --documents --input /usr/lib/python3.11 --output-prefix data/stdlib
  python tools/preprocess_pairs.py --merge data/part0 data/part1 --output-prefix data/all
  python tools/preprocess_pairs.py verify data/all data/part0     # full check: sha256 against the sidecar
"""

from __future__ import annotations

import argparse
import json
import sys

from megapmp.data.groups import GROUP_KEYS, MAX_GROUP_RESPONSES
from megapmp.data.indexed import ShardError
from megapmp.data.preprocess import BPE_SAMPLE_MB, IDENTICAL_POLICIES, InputError, build_shard
from megapmp.data.shards import OutputError, merge_shard_set, verify_shards

TRUNCATION_HELP = (
    "What to do with a pair whose prompt + response exceeds --max-length tokens: 'error' rejects it "
    "(stop, or skip with --on-error skip); 'truncate' cuts the prompt from the left (keeping at least "
    "half of --max-length, or all of it if shorter) just enough for the longest response, then cuts "
    "responses from the right (keeping EOS as their last token under --eos-policy response). Truncations are "
    "counted in the stats."
)


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `verify PREFIX...` (as the first word, --no-progress aside) stands for --verify PREFIX...
    if [a for a in argv if a != "--no-progress"][:1] == ["verify"]:
        argv[argv.index("verify")] = "--verify"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], metavar="FILE",
                   help="JSONL or JSONL.gz files of pairs, read in the order given (documents mode: also "
                        "directories or source files, one file = one document)")
    p.add_argument("--output-prefix", default=None, metavar="PREFIX",
                   help="output path without extension: PREFIX.bin, PREFIX.idx, PREFIX.json, PREFIX.tokenizer/")
    p.add_argument("--tokenizer", default="byte", metavar="SPEC",
                   help="byte (embedded UTF-8 bytes, the default); bpe:N (train an N-token byte-level BPE on the "
                        "input in seconds, saved beside the shards); a tokenizer.json or HF tokenizer directory "
                        "(e.g. Qwen2's); a SentencePiece .model; a tiktoken .tiktoken BPE file; or hf:/sp:/tiktoken: "
                        "prefixed paths")
    p.add_argument("--bpe-sample-mb", type=float, default=BPE_SAMPLE_MB, metavar="MB",
                   help=f"with bpe:N, train it on the first MB megabytes of input text (default {BPE_SAMPLE_MB:g}); "
                        "records are fed in pieces of at most 64k characters cut at line ends, so the training "
                        "memory follows this budget whatever the record sizes (about 0.2 GB at the default)")
    p.add_argument("--keys", default=None, metavar="K1,K2,K3",
                   help="field names of prompt, chosen, rejected (default prompt,chosen,rejected; CodePMP's data: "
                        "query,better,worse); with --groups of prompt, responses, labels (default "
                        "prompt,responses,labels); in documents mode the one text field of JSONL input (default text)")
    p.add_argument("--template", default="none", metavar="none|codepmp|FILE",
                   help="prompt template: none, codepmp (CodePMP's code-generation prompt), or a file containing "
                        "{prompt} (or {query}) where the prompt goes")
    p.add_argument("--eos-policy", default=None, choices=["response", "none"],
                   help="none (the default for pairs: the paper's 'w/o EOC', CodePMP section 5.2 / Table 7): no "
                        "EOS after a response, the reward is read at its last token (a response ending in the pad "
                        "token is then a bad record). response ('w/ EOC'): append EOS to every response, the reward "
                        "is read at that EOS. Documents get EOS appended unless 'none' is given. Recorded in the "
                        "shard, and scoring, serving and HF export follow it")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="maximum tokens of prompt + response, for each of chosen and rejected (paper: 1024)")
    p.add_argument("--overlong", default="error", choices=["error", "truncate"], help=TRUNCATION_HELP)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes; output is identical for any N")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="fail: stop at the first bad record with its file, line and field, exit 2, leave no "
                        "output; skip: leave bad records out, write each to --rejects with its reason")
    p.add_argument("--rejects", default=None, metavar="FILE",
                   help="JSONL of rejected records (needed with skip); must not be an input")
    p.add_argument("--identical", default="reject", choices=list(IDENTICAL_POLICIES),
                   help="a pair whose chosen equals its rejected carries no preference: 'reject' treats it as a "
                        "bad record (stop, or skip and count it with --on-error skip); 'keep' trains on it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing shard at --output-prefix (by default that is an error)")
    p.add_argument("--documents", action="store_true",
                   help="plain-document mode for LM pretraining: each file (or JSONL line) is one token document")
    p.add_argument("--groups", action="store_true",
                   help="group mode: each JSONL record is a prompt with K labelled responses ('responses' + "
                        "'labels', booleans or scores, or 'chosen' + 'rejected' lists), one document of 1 + K "
                        "sequences with PREFIX.labels beside it; a group needs >= 2 responses and one labelled pair, "
                        f"at most {MAX_GROUP_RESPONSES} responses; --max-length applies to the prompt with each "
                        "response")
    p.add_argument("--vocab-multiple", type=int, default=128, metavar="M",
                   help="record the vocab size padded to a multiple of M (the trainer multiplies by its TP size)")
    p.add_argument("--merge", nargs="+", default=None, metavar="PREFIX",
                   help="instead of tokenizing: merge these shards (partitions written separately, same tokenizer "
                        "and policies) into --output-prefix, in the order given")
    p.add_argument("--verify", nargs="+", default=None, metavar="PREFIX",
                   help="instead of tokenizing: check these shards fully (index, sizes and both files' sha256 "
                        "against the sidecar); also spelled `verify PREFIX...`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify is None and args.output_prefix is None:
        p.error("the following arguments are required: --output-prefix")
    if args.groups and args.documents:
        p.error("--groups and --documents exclude each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.verify:
            metas = verify_shards(args.verify, progress=not args.no_progress)
            for prefix, meta in zip(args.verify, metas):
                print(f"{prefix}: ok ({json.dumps(meta.counts)})")
            return 0
        if args.merge:
            meta = merge_shard_set(args.merge, args.output_prefix, overwrite=args.overwrite)
            stats = meta.counts
        else:
            kind = "documents" if args.documents else "groups" if args.groups else "pairs"
            default_keys = {"documents": "text", "groups": ",".join(GROUP_KEYS),
                            "pairs": "prompt,chosen,rejected"}[kind]
            stats = build_shard(
                args.input, args.output_prefix, kind=kind, tokenizer=args.tokenizer,
                keys=tuple((args.keys or default_keys).split(",")), template=args.template,
                eos_policy=args.eos_policy, max_length=args.max_length, overlong=args.overlong,
                workers=args.workers, on_error=args.on_error, rejects_path=args.rejects,
                vocab_multiple=args.vocab_multiple, identical=args.identical, overwrite=args.overwrite,
                progress=not args.no_progress, bpe_sample_mb=args.bpe_sample_mb)
    except (InputError, OutputError, ShardError, ValueError, OSError) as e:
        # OSError covers what the checks cannot foresee (a full disk, a file that vanished); its
        # message names the file.
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    if stats.get("rejected"):
        print(f"warning: {stats['rejected']} records rejected, listed in {args.rejects}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
