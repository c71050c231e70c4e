"""Test-wide settings that must precede every import, and the ``cuda`` marker.

TRITON_INTERPRET is read by triton when a kernel is jitted, and torch's inductor obeys it too, so it is
set here, before any test module runs, and ONLY when no CUDA device is visible (tests/triton_interpreter.py
says why): on a CPU the Triton kernels run on the interpreter; on a GPU they, compiled FlexAttention and
the compiled layers run as real kernels. Tests that need the interpreter skip without it; tests marked
``cuda`` skip without a GPU.
"""

import os

from triton_interpreter import use_interpreter

INTERPRETING = use_interpreter()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment settings above)


def pytest_collection_modifyitems(config, items):
    from triton_interpreter import cuda_visible

    if cuda_visible():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: small GEMMs on a 2-core machine shared with other work are much
    slower with 2 OpenMP threads (measured ~1.5 ms vs 36 us for a small tiled GEMM)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
