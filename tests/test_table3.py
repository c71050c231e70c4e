"""Every shipped config and launch script holds CodePMP's Table 3, transcribed here from the paper.

Source: CodePMP (arXiv 2410.02229), appendix A, "Table 3: Hyperparameters for CodePMP training, mathematical
reasoning RM finetuning, and logical reasoning RM finetuning" (the full text is in ../shared/seeds/003_*.txt).
"-" in the paper (no decay ratio for WCD) is None here. The loss of each stage: L_PMP = L_rank + L_LM
(section 3.1, Algorithm 1 line 9); RM finetuning trains the ranking loss alone (section 2, "Reward Modeling").

A config is checked as the trainer reads it (TOML -> TrainConfig); a launch script as it would launch, from
the torchrun command its DRY_RUN=1 prints (config file plus every override it passes).
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megapmp.config import load_train_config, model_preset, parse_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"

# (column, size) -> the Table 3 rows, exactly as printed.
TABLE_3 = {
    ("CodePMP", "1.5B"): dict(epoch=1, bs=1024, lr=3e-6, scheduler="WSD", warmup=0.03, decay=0.1, wd=0.1, max_length=1024),
    ("CodePMP", "7B"): dict(epoch=1, bs=1024, lr=1e-6, scheduler="WSD", warmup=0.03, decay=0.1, wd=0.1, max_length=1024),
    ("Mathematical RM", "1.5B"): dict(epoch=1, bs=64, lr=1e-6, scheduler="WCD", warmup=0.03, decay=None, wd=0,
                                      max_length=1024),
    ("Mathematical RM", "7B"): dict(epoch=1, bs=64, lr=3e-7, scheduler="WCD", warmup=0.03, decay=None, wd=0,
                                    max_length=1024),
    ("Logical RM", "1.5B"): dict(epoch=1, bs=64, lr=1e-5, scheduler="WCD", warmup=0.25, decay=None, wd=0,
                                 max_length=1024),
    ("Logical RM", "7B"): dict(epoch=1, bs=64, lr=1e-5, scheduler="WCD", warmup=0.25, decay=None, wd=0,
                               max_length=1024),
}
PRESETS = {"1.5B": "qwen2-1.5b", "7B": "qwen2-7b"}  # the paper initialises from Qwen2-1.5B / Qwen2-7B (4.1.1)

# Each shipped config: its Table 3 column, or why it has none.
SHIPPED = {
    "pmp_1.5b.toml": ("CodePMP", "1.5B"),
    "pmp_7b.toml": ("CodePMP", "7B"),
    "rm_math_1.5b.toml": ("Mathematical RM", "1.5B"),
    "rm_math_7b.toml": ("Mathematical RM", "7B"),
    "rm_logic_1.5b.toml": ("Logical RM", "1.5B"),
    "rm_logic_7b.toml": ("Logical RM", "7B"),
}
NOT_A_PAPER_RECIPE = {"tiny.toml": "the CPU config of the tests, the quickstart and the golden curve"}

# Each launch script: its environment (paths are placeholders: DRY_RUN=1 starts nothing) and Table 3 column.
DUMMY = {"TRAIN_DATA": "/data/train", "INIT_FROM": "/runs/pmp", "QWEN2_1_5B_DIR": "/models/q15",
         "QWEN2_7B_DIR": "/models/q7"}
SCRIPTS = {
    ("pretrain_pmp_1.5b.sh", ""): ("CodePMP", "1.5B"),
    ("pretrain_pmp_7b.sh", ""): ("CodePMP", "7B"),
    **{(f"finetune_rm_{task}.sh", scale): (column, size)
       for task, column in (("mathshepherd", "Mathematical RM"), ("reclor", "Logical RM"), ("logiqa2", "Logical RM"))
       for scale, size in (("1.5b", "1.5B"), ("7b", "7B"))},
}


SCRIPTS_WITHOUT_A_COLUMN = {
    "_launch.sh": "the torchrun launcher the scripts above source",
    "quickstart.sh": "the tiny CPU pipeline (tiny.toml)",
    "paper_experiment.sh": "the sample-efficiency sweep on the quickstart's tiny model",
    "codefavor.sh": "CodeFavor's pipeline (arXiv 2410.03837) on the quickstart's tiny model: not CodePMP's recipe",
    "reproduce_codepmp.sh": "the whole paper: at 1.5b/7b it trains through the scripts above (tests/test_reproduce.py)",
}


def table3_mismatches(cfg, column: str, size: str) -> list[str]:
    """Every way `cfg` differs from Table 3's (column, size) row; empty when it is the paper's recipe."""
    row, bad = TABLE_3[(column, size)], []

    def expect(name, got, want):
        if got != want:
            bad.append(f"{name} = {got!r}, Table 3 says {want!r}")

    expect("epochs", cfg.epochs, row["epoch"])
    expect("steps (0: derived from the epochs)", cfg.steps, 0)
    expect("data.items_per_step (bs)", cfg.data.items_per_step, row["bs"])
    expect("optimizer.lr", cfg.optimizer.lr, row["lr"])
    expect("schedule.name", cfg.schedule.name.upper(), row["scheduler"])
    expect("schedule.warmup_fraction", cfg.schedule.warmup_fraction, row["warmup"])
    expect("schedule.decay_fraction", cfg.schedule.decay_fraction, row["decay"] if row["decay"] is not None else 0.0)
    expect("optimizer.weight_decay", cfg.optimizer.weight_decay, row["wd"])
    expect("data.max_length", cfg.data.max_length, row["max_length"])
    expect("model (preset sizes)", cfg.model, model_preset(PRESETS[size]))
    expect("loss (rm_coef, lm_coef)", (cfg.loss.rm_coef, cfg.loss.lm_coef),
           (1.0, 1.0) if column == "CodePMP" else (1.0, 0.0))
    return bad


def test_every_shipped_config_is_classified():
    """A new config must say which Table 3 column it implements (or why none)."""
    assert {p.name for p in CONFIGS.glob("*.toml")} == set(SHIPPED) | set(NOT_A_PAPER_RECIPE)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_config_is_table_3(name):
    cfg = load_train_config(str(CONFIGS / name))
    cfg.data.train = ["placeholder"]
    cfg.validate()  # also: data.seq_len holds a pair of two max_length sequences
    assert table3_mismatches(cfg, *SHIPPED[name]) == []


def test_a_wrong_value_fails_the_check():
    """The check is not vacuous: the 1.5B PMP config with the 7B learning rate (the old configs' mistake),
    a WSD RM config, and weight decay on an RM each fail it."""
    cfg = load_train_config(str(CONFIGS / "pmp_1.5b.toml"), [("optimizer.lr", "1e-6")])
    assert table3_mismatches(cfg, "CodePMP", "1.5B") == ["optimizer.lr = 1e-06, Table 3 says 3e-06"]
    cfg = load_train_config(str(CONFIGS / "rm_logic_7b.toml"), [("schedule.name", "wsd"), ("optimizer.weight_decay", "0.1"),
                                                              ("steps", "1000")])
    assert len(table3_mismatches(cfg, "Logical RM", "7B")) == 3


def test_every_launch_script_is_classified():
    scripts = {p.name for p in (REPO / "examples").glob("*.sh")}
    assert scripts == {s for s, _ in SCRIPTS} | set(SCRIPTS_WITHOUT_A_COLUMN)


def dry_run_command(script: str, scale: str) -> list[str]:
    """The megapmp.train arguments `script` would launch, from its DRY_RUN=1 output."""
    env = {**os.environ, **DUMMY, "DRY_RUN": "1", "PYTHON": sys.executable, "NNODES": "1", "GPUS_PER_NODE": "8"}
    if scale:
        env["SCALE"] = scale
    proc = subprocess.run(["bash", str(REPO / "examples" / script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[launch] dry run:"))
    return shlex.split(line.split(" -m megapmp.train ", 1)[1])


@pytest.mark.parametrize("script,scale", sorted(SCRIPTS), ids=[f"{s}{'-' + c if c else ''}" for s, c in sorted(SCRIPTS)])
def test_launch_script_launches_table_3(script, scale):
    args = dry_run_command(script, scale)
    config = args[args.index("--config") + 1]
    overrides = parse_overrides(args[args.index("--run-dir") + 2:])
    cfg = load_train_config(str(REPO / config), overrides)
    assert table3_mismatches(cfg, *SCRIPTS[(script, scale)]) == []
    assert cfg.data.train == ["/data/train"]
