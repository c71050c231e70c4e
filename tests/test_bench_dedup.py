"""tools/bench_dedup.py end to end on a small planted corpus: one JSON line with the documented keys, and
both sides (megapmp's MinHash/LSH and datasketch's) removing exactly the planted near duplicates."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASE = textwrap.dedent('''
    def tokenize_line(line, separators=" ,;"):
        """Split a line into words, dropping empty ones and stripping quotes around each word."""
        words, word = [], ""
        for ch in line:
            if ch in separators:
                if word:
                    words.append(word.strip("'\\""))
                word = ""
                continue
            word += ch
        if word:
            words.append(word.strip("'\\""))
        return [w for w in words if w]
''')
DISTINCT = [textwrap.dedent(f'''
    def helper_{i}(values, scale={i}):
        """Scale every value by {i} and keep the positive results."""
        out = []
        for v in values:
            if v * scale > {i * 7}:
                out.append(v * scale - {i})
        return sorted(out, reverse={i % 2 == 0})
''') for i in range(6)]


def test_bench_dedup_reports_both_sides(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.py").write_text(BASE + "".join(DISTINCT))
    # two near copies of BASE later in walk order, each renamed (the name is the 2nd token, so only 3 of ~105
    # shingles change: Jaccard 0.96, clear of the 0.85 threshold for either side's estimate): both removed
    (src / "b.py").write_text(BASE.replace("tokenize_line", "split_line"))
    (src / "c.py").write_text(BASE.replace("tokenize_line", "words_of"))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_dedup.py"), "--source", str(src),
                           "--repeats", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    out = json.loads(lines[0])
    assert out["snippets"] == 1 + len(DISTINCT) + 2 and out["corpus"] == "custom"
    assert out["own_removed"] == out["datasketch_removed"] == out["both_removed"] == 2 and out["overlap"] == 1.0
    assert out["own_s"] > 0 and out["datasketch_s"] > 0 and out["datasketch_over_own"] > 0
