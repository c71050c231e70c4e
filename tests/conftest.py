"""Test-wide settings that must precede every import.

TRITON_INTERPRET is read by triton when it is first imported, and several modules import it (the
kernel tests, the backend probe); setting it here makes the Triton kernels run on the CPU
interpreter whichever test imports triton first. The tests are CPU-only by design.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
