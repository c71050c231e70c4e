"""The repository's kernels/ folder never shadows Hugging Face's `kernels` package.

transformers (5.2x) imports `kernels` (Hugging Face's hub kernels). With the repository root on sys.path --
`python -m pytest`, `python -m megapmp.train`, the quickstart -- a `kernels/__init__.py` here would be found
first and break every transformers import. These tests start fresh interpreters from the repository root,
as a user's commands do.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    # `-c` puts the working directory (the root) first on sys.path, exactly like `python -m`.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_hf_kernels_is_installed():
    # The dev extra names `kernels`, so the shadowing test below can never pass because it is absent.
    assert importlib.metadata.version("kernels")


def test_transformers_megapmp_and_megapmp_kernels_import_from_the_root():
    out = _run_from_root(
        "import kernels, megapmp, megapmp_kernels\n"
        "from transformers import Qwen2ForSequenceClassification\n"
        "from megapmp_kernels import pair_loss\n"
        "print(kernels.__file__)\n"
        "print(megapmp_kernels.__file__)\n")
    assert out.returncode == 0, out.stderr[-2000:]
    hf_kernels, ours = out.stdout.split()
    assert not Path(hf_kernels).resolve().is_relative_to(ROOT / "kernels"), f"`kernels` is this repository's: {hf_kernels}"
    assert Path(ours).resolve() == ROOT / "kernels" / "megapmp_kernels" / "__init__.py"


def test_nothing_in_the_kernels_folder_is_a_module_named_kernels():
    # Without Hugging Face's package (sys.path cut down to the root alone), `kernels` may at most be an
    # empty namespace: no kernels/__init__.py, and no kernel module reachable as kernels.<name>.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = _run_from_root(
        "import importlib.util, sys\n"
        f"sys.path[:] = [{str(ROOT)!r}]\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec is None or spec.origin is None)\n"
        "for name in ('kernels.pair_loss', 'kernels.megapmp_kernels.pair_loss'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print('imported', name)\n"
        "    except ImportError:\n"
        "        pass\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"], out.stdout
