"""Test-wide settings that must precede every import.

TRITON_INTERPRET is read by triton when it is first imported, and several modules import it (the
kernel tests, the backend probe); setting it here makes the Triton kernels run on the CPU
interpreter whichever test imports triton first. The tests are CPU-only by design.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment settings above)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: small GEMMs on a 2-core machine shared with other work are much
    slower with 2 OpenMP threads (measured ~1.5 ms vs 36 us for a small tiled GEMM)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
