"""Pairwise judges (CodeFavor's classification judges) in megapmp: judge samples as label-token pairs, training
as a one-token LM target, the judge scorer against transformers, both-order evaluation (a judge that always
names the first position scores exactly 0.5), POST /compare, and the pipeline from Commit-Instruct / Critic-Evol
pairs to a trained judge evaluated on CodePrefBench."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from megapmp.data.judge import (CLASSIFICATION_TEMPLATE, JudgeFormat, aspect_criterion, judge_samples,
                                resolve_judge_template, strip_comments)
from megapmp.eval.judge_scorer import JudgeScorer, probability_first_better
from tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEGAPMP_DATA", REPO.parent / "shared" / "data"))
CPB = DATA / "codeprefbench"
ASPECTS = ("correctness-alignment", "efficiency-alignment", "security-alignment", "human-preference-alignment")


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Instruction, correct code (chosen) and a code with one wrong operator (rejected)."""
    rng = random.Random(seed)
    ops = [("+", "-"), ("<", ">="), ("==", "!="), ("*", "//")]
    out = []
    for i in range(n):
        good, bad = rng.choice(ops)
        c = rng.randint(1, 9)
        code = lambda op: f"def f{i}(x):\n    # combine x and {c}\n    return x {op} {c}\n"  # noqa: E731
        out.append({"id": f"p{i}", "prompt": f"Write f{i}(x) returning x {good} {c}.", "chosen": code(good),
                    "rejected": code(bad)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def codeprefbench_files(root: Path, n: int = 6, aspects=ASPECTS) -> list[str]:
    """CodePrefBench aspects in its format, with made-up tasks (gt_choice alternating)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for aspect in aspects:
        rows = []
        for i, p in enumerate(toy_pairs(n, seed=len(aspect))):
            gt = i % 2
            choices = [p["chosen"], p["rejected"]] if gt == 0 else [p["rejected"], p["chosen"]]
            rows.append({"task_id": f"{aspect}/{i}", "instruction": p["prompt"], "choices": choices, "gt_choice": gt})
        paths.append(str(write_jsonl(root / f"{aspect}.jsonl", rows)))
    return paths


def make_judge_checkpoint(root: Path, *, always_first: bool = False, seed: int = 0) -> Path:
    """A tiny one-layer judge saved as the trainer saves it, its training shard's sidecar recording the judge
    format (byte tokenizer, labels A/B). ``always_first``: the attention and MLP outputs are zero, so the
    answer position's hidden state is the embedding of the template's last token whatever the codes, and the
    label rows are set so that the first label always wins: a judge that always says "A"."""
    from megapmp.checkpoint import save_checkpoint
    from megapmp.config import TrainConfig, model_preset
    from megapmp.data.preprocess import judge_label_ids
    from megapmp.data.shards import ShardMeta
    from megapmp.data.tokenizers import ByteTokenizer
    from megapmp.model import Qwen2RewardModel

    cfg = TrainConfig()
    cfg.model = model_preset("tiny")
    cfg.model.num_hidden_layers = 1
    tok = ByteTokenizer()
    fmt = JudgeFormat()
    meta = ShardMeta(kind="pairs", tokenizer=tok.identity(), vocab_size=tok.vocab_size, padded_vocab_size=384,
                     vocab_multiple=128, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype="uint16",
                     template={"name": "none", "text": "{prompt}"}, eos_policy="none",
                     judge=fmt.to_meta(judge_label_ids(tok, fmt.labels)))
    cfg.data.train = [str(root / "data" / "train")]
    torch.manual_seed(seed)
    model = Qwen2RewardModel(cfg.model)
    model.init_weights()
    with torch.no_grad():
        if always_first:
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.zero_()
            a, b = meta.judge["label_ids"]
            last = tok.encode(CLASSIFICATION_TEMPLATE[-1])[0]  # the template ends with this token
            model.embed_tokens.weight[a] = model.embed_tokens.weight[b] + 0.5 * model.embed_tokens.weight[last]
        else:
            model.embed_tokens.weight.normal_(0, 0.5)  # label log-odds spread well away from 0
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    trainer_state = {"step": 1, "skipped_steps": 0, "consecutive_nonfinite": 0, "optimizer": {}, "loader": {},
                     "rng": {}, "config": asdict(cfg), "shard_meta": asdict(meta)}
    save_checkpoint(root / "checkpoints", 1, model_state=state, optimizer_tensors={}, trainer_state=trainer_state)
    return root


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return make_judge_checkpoint(tmp_path_factory.mktemp("judge_run"), seed=1)


@pytest.fixture(scope="module")
def judge(judge_dir, one_thread):
    return JudgeScorer.load(judge_dir, progress=False)


# -- the judge's input -------------------------------------------------------------------------------------


def test_judge_format_renders_both_orders_and_checks_templates(tmp_path):
    fmt = JudgeFormat()
    chosen, rejected = "def f():\n    '''doc'''\n    return {'a': 1}  # braces\n", "def f():\n    return {}\n"
    first, second = judge_samples("Make {code_b} a dict.", chosen, rejected, fmt, criteria="Be right.")
    assert (first["chosen"], first["rejected"], second["chosen"], second["rejected"]) == ("A", "B", "B", "A")
    assert first["prompt"] == (
        "[INSTRUCTION]\nMake {code_b} a dict.\n\n[CODE_A]\n```python\ndef f():\n    return {'a': 1}\n```\n\n"
        "[CODE_B]\n```python\ndef f():\n    return {}\n```\n\n[CRITERIA]\nBe right.\n\nWhich code better meets "
        "[CRITERIA] while following [INSTRUCTION]? Answer A or B.\n[ANSWER] ")
    assert second["prompt"].index("return {}") < second["prompt"].index("return {'a': 1}")
    # comments and docstrings stripped (as CodeFavor's judges see code); code that does not parse is kept
    assert strip_comments("x = 1  # one\n'''doc'''\n") == "x = 1"
    assert strip_comments("def broken(:\n  # c") == "def broken(:\n  # c"
    kept = JudgeFormat(strip_comments=False).render("i", chosen, rejected)
    assert "# braces" in kept and "[CRITERIA]\nThe better code" in kept  # the default criterion
    assert aspect_criterion("efficiency-alignment").startswith("The better code runs faster")
    template = tmp_path / "t.txt"
    template.write_text("Q: {instruction}\n1: {code_a}\n2: {code_b}\nbetter:")
    name, text = resolve_judge_template(str(template))
    assert JudgeFormat(template=text, template_name=name).render("do", "a", "b") == "Q: do\n1: a\n2: b\nbetter:"
    template.write_text("{instruction} {code_a}")
    with pytest.raises(ValueError, match=r"\{code_b\} 0 times"):
        resolve_judge_template(str(template))
    with pytest.raises(ValueError, match="two different"):
        JudgeFormat(labels=("A", "A"))


def test_make_judge_data_writes_a_judge_shard(tmp_path):
    from megapmp.data.datasets import PairDataset

    tool = load_tool("make_judge_data")
    pairs = toy_pairs(6)
    pairs[0]["criteria"] = "The code must be correct."
    write_jsonl(tmp_path / "pairs.jsonl", pairs + [dict(pairs[1], id="same", rejected=pairs[1]["chosen"] + "# x\n")])
    prefix = tmp_path / "judge" / "both"
    assert tool.main(["--input", str(tmp_path / "pairs.jsonl"), "--output-prefix", str(prefix), "--both-order",
                      "--no-progress"]) == 0
    samples = [json.loads(x) for x in Path(f"{prefix}.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12  # the pair identical up to a comment gives none
    assert [s["chosen"] for s in samples] == ["A", "B"] * 6 and "The code must be correct." in samples[0]["prompt"]
    meta = json.loads(Path(f"{prefix}.json").read_text())
    assert meta["eos_policy"] == "none" and meta["judge"]["labels"] == ["A", "B"]
    assert meta["judge"]["label_ids"] == [ord("A"), ord("B")] and meta["judge"]["kind"] == "pairwise-classification"
    ds = PairDataset(str(prefix))  # every sample: the rendered prompt, then one label token each
    for i, s in enumerate(samples):
        assert ds[i].prompt.tolist() == list(s["prompt"].encode())
        assert ds[i].chosen.tolist() == [ord(s["chosen"])] and ds[i].rejected.tolist() == [ord(s["rejected"])]
    # one order per pair: drawn from (seed, id), so the same for any input order
    one = tmp_path / "judge" / "one"
    assert tool.main(["--input", str(tmp_path / "pairs.jsonl"), "--output-prefix", str(one), "--seed", "3",
                      "--no-progress"]) == 0
    picked = [json.loads(x)["id"] for x in Path(f"{one}.samples.jsonl").read_text().splitlines()]
    assert len(picked) == 6 and {p[-1] for p in picked} == {"0", "1"}
    write_jsonl(tmp_path / "reversed.jsonl", pairs[::-1])
    assert tool.main(["--input", str(tmp_path / "reversed.jsonl"), "--output-prefix", str(one), "--seed", "3",
                      "--overwrite", "--no-progress"]) == 0
    assert sorted(json.loads(x)["id"] for x in Path(f"{one}.samples.jsonl").read_text().splitlines()) == sorted(picked)
    # refusals: one line, exit 2
    assert tool.main(["--input", str(tmp_path / "pairs.jsonl"), "--output-prefix", str(prefix), "--no-progress"]) == 2
    assert tool.main(["--input", str(tmp_path / "pairs.jsonl"), "--output-prefix", str(tmp_path / "x"),
                      "--labels", "yes,no", "--no-progress"]) == 2  # a label of 3 byte tokens
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}])
    assert tool.main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "y"),
                      "--no-progress"]) == 2
    assert not Path(f"{tmp_path / 'x'}.samples.jsonl").exists()  # no samples left without their shard
    # a judge shard holds only label pairs; it blends with no other shard
    from megapmp.data.datasets import check_compatible
    from megapmp.data.indexed import ShardError
    from megapmp.data.preprocess import build_shard
    from megapmp.data.shards import ShardMeta
    from megapmp.io import InputError

    write_jsonl(tmp_path / "hand.jsonl", [{"prompt": "p", "chosen": "A", "rejected": "C"}])
    with pytest.raises(InputError, match=r"hand.jsonl:1 field 'rejected': a judge sample's chosen and rejected"):
        build_shard([str(tmp_path / "hand.jsonl")], str(tmp_path / "hand"), eos_policy="none",
                    judge=JudgeFormat().to_meta([]), progress=False)
    build_shard([str(tmp_path / "pairs.jsonl")], str(tmp_path / "plain"), progress=False)
    with pytest.raises(ShardError, match="judge"):
        check_compatible([ShardMeta.load(prefix), ShardMeta.load(tmp_path / "plain")], [str(prefix), "plain"])


def test_judge_training_is_cross_entropy_on_the_label_token(tmp_path):
    """One step of the unchanged trainer on a judge shard: its LM loss is the mean cross-entropy, over the whole
    vocabulary, of the label token at the prompt's last position, computed here by a plain forward."""
    from dataclasses import replace

    from megapmp.config import ConfigError, load_train_config
    from megapmp.data.datasets import PairDataset
    from megapmp.model.attention import AttentionInputs
    from megapmp.train import Trainer

    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(5))
    load_tool("make_judge_data").main(["--input", str(tmp_path / "pairs.jsonl"), "--output-prefix",
                                       str(tmp_path / "judge"), "--both-order", "--no-progress"])
    cfg = load_train_config(str(REPO / "examples" / "configs" / "tiny.toml"), [
        ("data.train", str(tmp_path / "judge")), ("data.layout", "shared-prefix"), ("loss.rm_coef", "0"),
        ("steps", "1"), ("data.items_per_step", "10"), ("data.micro_batches", "2"), ("data.seq_len", "1024"),
        ("logging.progress", "false"), ("logging.eval_interval", "0"), ("checkpoint.interval", "0"),
        ("num_threads", "1")])
    with pytest.raises(ConfigError, match="LM term only"):  # a judge shard under the PMP objective is refused
        Trainer(replace(cfg, loss=replace(cfg.loss, rm_coef=1.0)), tmp_path / "pmp")
    assert not (tmp_path / "pmp").exists()
    trainer = Trainer(cfg, tmp_path / "run")
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit()
    model = trainer.model
    model.load_state_dict(initial)
    ds = PairDataset(str(tmp_path / "judge"))
    losses = []
    with torch.no_grad():
        for i in range(len(ds)):
            ids = torch.from_numpy(ds[i].prompt.astype(np.int64))[None]
            hidden = model(ids, torch.arange(ids.shape[1])[None], AttentionInputs.from_segments(torch.zeros_like(ids,
                                                                                                   dtype=torch.int32)))
            logits = model.lm_logits(hidden[0, -1]).float()
            losses.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([int(ds[i].chosen[0])])))
    assert history[0]["rm_loss"] == 0 and history[0]["pairs"] == 10
    assert history[0]["lm_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


# -- scoring --------------------------------------------------------------------------------------------------


def test_judge_log_odds_match_transformers_and_are_batch_invariant(judge_dir, judge, tmp_path):
    from transformers import AutoModelForCausalLM

    from megapmp.convert.export import export_to_hf

    pairs = toy_pairs(12, seed=5)
    comparison = judge.compare([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                               [p["rejected"] for p in pairs])
    x = comparison.log_odds
    assert x.shape == (12, 2) and np.abs(x).min() > 1e-3 and not comparison.truncated
    np.testing.assert_array_equal(comparison.probability, probability_first_better(x[:, 0], x[:, 1]))
    np.testing.assert_allclose(comparison.probability,
                               (1 / (1 + np.exp(-x[:, 0])) + 1 / (1 + np.exp(x[:, 1]))) / 2, atol=1e-15)
    # batch invariance: each comparison alone gives the same bits
    for i in (0, 5, 11):
        alone = judge.compare([pairs[i]["prompt"]], [pairs[i]["chosen"]], [pairs[i]["rejected"]])
        np.testing.assert_array_equal(alone.log_odds[0], x[i])
    # transformers on the HF export (an independent implementation): the two label logits at the last token
    export_to_hf(judge_dir, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    first, second = judge.render([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                 [p["rejected"] for p in pairs])
    a, b = judge.label_ids
    with torch.no_grad():
        for col, texts in enumerate((first, second)):
            for i, text in enumerate(texts):
                logits = hf(input_ids=torch.tensor([list(text.encode())])).logits[0, -1].double()
                assert float(logits[a] - logits[b]) == pytest.approx(x[i, col], abs=1e-5)
    # the export records the judge format: it loads as the same judge
    exported = JudgeScorer.load(tmp_path / "hf", progress=False)
    np.testing.assert_allclose(exported.compare([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                                [p["rejected"] for p in pairs]).log_odds, x, atol=1e-6)


def test_reward_model_tools_refuse_a_judge_and_the_judge_refuses_a_reward_model(judge_dir, tmp_path):
    from megapmp.convert.source import ConvertError
    from megapmp.eval.reward_model import RewardScorer
    from tests.test_eval_metrics import make_checkpoint

    with pytest.raises(ConvertError, match="is a pairwise judge"):
        RewardScorer.load(judge_dir)
    rm = make_checkpoint(tmp_path / "rm")
    with pytest.raises(ConvertError, match="not a pairwise judge"):
        JudgeScorer.load(rm)
    files = codeprefbench_files(tmp_path / "cpb", n=2)
    evaluate = load_tool("evaluate")
    assert evaluate.main(["codeprefbench", "--judge", "reward", "--model", str(judge_dir), "--data", *files,
                          "--output", str(tmp_path / "r.json"), "--no-progress"]) == 2
    assert evaluate.main(["codeprefbench", "--judge", "pairwise", "--model", str(rm), "--data", *files,
                          "--output", str(tmp_path / "r.json"), "--no-progress"]) == 2
    # without --judge the model's record decides: the RM is scored by its rewards
    assert evaluate.main(["codeprefbench", "--model", str(rm), "--data", *files, "--output", str(tmp_path / "r.json"),
                          "--no-progress"]) == 0
    assert "judge" not in json.loads((tmp_path / "r.json").read_text())["results"]


def test_a_judge_that_always_says_A_scores_exactly_half_with_both_orders(tmp_path, one_thread):
    always = make_judge_checkpoint(tmp_path / "always", always_first=True)
    if CPB.is_dir():  # the shared categories (a few tasks each), the other two made up
        files = [str(CPB / "correctness-alignment.jsonl.gz"), str(CPB / "efficiency-alignment.jsonl.gz")]
        files += codeprefbench_files(tmp_path / "cpb", aspects=ASPECTS[2:])
    else:
        files = codeprefbench_files(tmp_path / "cpb")
    out = tmp_path / "always.json"
    assert load_tool("evaluate").main(["codeprefbench", "--model", str(always), "--data", *files, "--limit", "6",
                                       "--output", str(out), "--markdown", str(tmp_path / "always.md"),
                                       "--save-scores", str(tmp_path / "scores.jsonl"), "--no-progress"]) == 0
    r = json.loads(out.read_text())["results"]
    assert r["judge"] == "pairwise" and r["overall"] == 0.5 and r["macro"] == 0.5
    assert set(ASPECTS) <= set(r["aspects"])
    for aspect, v in r["aspects"].items():
        # it picks the first position every time: right in one order, wrong in the other, a tie overall
        assert (v["accuracy"], v["accuracy_chosen_first"], v["accuracy_chosen_second"]) == (0.5, 1.0, 0.0), aspect
        assert v["ties"] == v["pairs"] == 6
    scores = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert all(s["log_odds_chosen_first"] == s["log_odds_rejected_first"] > 0 and s["p_chosen"] == 0.5
               for s in scores)
    assert "chosen shown first" in (tmp_path / "always.md").read_text()


# -- the server ---------------------------------------------------------------------------------------------


def post(url: str, body: dict) -> tuple[int, dict]:
    """(status, JSON answer) of a POST, error statuses included."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_compare_route_serves_the_judge_batch_invariantly(judge_dir, judge):
    import urllib.request

    from megapmp.serve.app import BackgroundServer, ServeSettings, build_app

    pairs = toy_pairs(8, seed=7)
    body = {"instructions": [p["prompt"] for p in pairs], "codes_a": [p["chosen"] for p in pairs],
            "codes_b": [p["rejected"] for p in pairs]}
    offline = judge.compare(body["instructions"], body["codes_a"], body["codes_b"])
    server = BackgroundServer(build_app(JudgeScorer.load(judge_dir, progress=False, batch_invariant=True),
                                       ServeSettings(max_wait_ms=20, max_texts=16)))
    url = f"http://127.0.0.1:{server.start()}"
    try:
        status, answer = post(url + "/compare", body)
        assert status == 200 and answer["truncated"] == []
        assert answer["probabilities"] == offline.probability.tolist()
        assert answer["log_odds"] == offline.log_odds.tolist()
        status, one = post(url + "/compare", {k: v[3:4] for k, v in body.items()})  # alone: the same bits
        assert one["probabilities"] == [offline.probability[3]]
        status, swapped = post(url + "/compare", {**body, "codes_a": body["codes_b"], "codes_b": body["codes_a"]})
        np.testing.assert_allclose(np.array(swapped["probabilities"]) + offline.probability, 1.0, atol=1e-15)
        assert post(url + "/compare", {**body, "criteria": ["x"] * 3})[0] == 400  # lengths differ
        assert post(url + "/compare", {**body, "codes_b": [1] * 8})[0] == 400
        assert post(url + "/compare", {"instructions": []})[0] == 400
        nine = {k: v + v[:1] for k, v in body.items()}  # 18 inputs in both orders, over --max-texts 16
        status, refused = post(url + "/compare", nine)
        assert status == 413 and "--max-texts" in refused["error"]
        assert post(url + "/score", {"prompts": ["p"], "responses": ["r"]})[0] in (404, 405)  # a judge gives no reward
        with urllib.request.urlopen(url + "/info", timeout=30) as response:
            info = json.loads(response.read())
        assert info["routes"]["compare"] == "POST /compare" and info["judge"]["labels"] == ["A", "B"]
    finally:
        server.stop()


def test_compare_refuses_a_code_longer_than_the_judge_reads_before_parsing_it(judge_dir, one_thread):
    """Stripping comments parses a code whole (ast.parse + ast.unparse: ~500 bytes of memory per byte, 0.9 GB for
    a 1.9 MB code within the body limit): a code over 16 characters per token of the judge's context is a 413
    naming the limit, and one within it is judged as offline."""
    from megapmp.serve.app import BackgroundServer, ServeSettings, build_app

    judge = JudgeScorer.load(judge_dir, progress=False, batch_invariant=True, max_length=128)
    limit = 16 * 128
    server = BackgroundServer(build_app(judge, ServeSettings(max_wait_ms=2)))
    url = f"http://127.0.0.1:{server.start()}"
    try:
        huge = "x = [" + "1," * 100_000 + "]"  # 200 kB of one expression: ~1 s and ~100 MB in the AST before
        status, answer = post(url + "/compare", {"instructions": ["i"], "codes_a": ["y = 1"], "codes_b": [huge]})
        assert status == 413 and f"codes_b[0] is {len(huge)} characters, over the limit of {limit}" in answer["error"]
        commented = "y = 1  # one\n" * (limit // 13)
        commented += "#" * (limit - len(commented))  # exactly at the limit: stripped and judged as offline
        body = {"instructions": ["i", "j"], "codes_a": [commented, "z = 2"], "codes_b": ["y = 1", commented]}
        status, answer = post(url + "/compare", body)
        offline = judge.compare(body["instructions"], body["codes_a"], body["codes_b"])
        assert status == 200 and answer["log_odds"] == offline.log_odds.tolist()
        status, answer = post(url + "/compare", {**body, "codes_a": [commented + "x", "z = 2"]})
        assert status == 413 and f"codes_a[0] is {limit + 1} characters" in answer["error"]
    finally:
        server.stop()


# -- the pipeline ---------------------------------------------------------------------------------------------


def test_pipeline_pairs_to_judge_to_codeprefbench(tmp_path, one_thread):
    """Critic-Evol-shaped and Commit-Instruct-shaped pairs -> make_judge_data --both-order -> the trainer (LM term
    only) -> codeprefbench --judge pairwise on the four aspects (the training loss falls from the uniform
    vocabulary's towards the two labels'; the report is a judge's)."""
    from megapmp.config import load_train_config
    from megapmp.train import Trainer

    pairs = toy_pairs(48, seed=11)
    for p in pairs[::2]:
        p.update(method="critic_evol", criteria="The code must compute what the instruction asks.")
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert load_tool("make_judge_data").main(["--input", str(tmp_path / "pairs.jsonl"), "--output-prefix",
                                              str(tmp_path / "judge"), "--both-order", "--no-progress"]) == 0
    cfg = load_train_config(str(REPO / "examples" / "configs" / "tiny.toml"), [
        ("data.train", str(tmp_path / "judge")), ("data.layout", "shared-prefix"), ("loss.rm_coef", "0"),
        ("steps", "30"), ("data.items_per_step", "16"), ("data.micro_batches", "1"), ("data.seq_len", "2048"),
        ("optimizer.lr", "3e-3"), ("logging.progress", "false"), ("logging.eval_interval", "0"),
        ("checkpoint.interval", "30"), ("num_threads", "1")])
    history = Trainer(cfg, tmp_path / "run").fit()
    assert history[-1]["lm_loss"] < 0.75 * history[0]["lm_loss"]
    out = tmp_path / "cpb.json"
    assert load_tool("evaluate").main(["codeprefbench", "--model", str(tmp_path / "run"), "--data",
                                       *codeprefbench_files(tmp_path / "cpb"), "--output", str(out),
                                       "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["judge"]["labels"] == ["A", "B"] and report["results"]["judge"] == "pairwise"
    assert set(report["results"]["aspects"]) == set(ASPECTS)
