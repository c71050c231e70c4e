"""Triton's CPU interpreter for the kernel tests: on only where no CUDA device is visible.

``TRITON_INTERPRET=1`` is process-wide, and torch's inductor obeys it too: in a run with a GPU it would send
every Triton kernel (compiled FlexAttention, compiled decoder layers, the loss kernels) to the interpreter,
where the CUDA tests would crawl, fail (numpy >= 2.4, below) or measure host copies instead of kernels. So
``use_interpreter()`` sets it only when CUDA is absent; on a GPU machine the interpreter tests are run in a
pytest call of their own with the GPU hidden (``CUDA_VISIBLE_DEVICES= python -m pytest ...``).

It also backports one fix of triton's own interpreter (made upstream after 3.6: ``__index__`` squeezes the
scalar's array): triton 3.6, the version on the lent GPUs, converts a scalar kernel argument (a 1-element
numpy array) with ``int(array)``, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted
to Python scalars"), so every ``range(0, V, BLOCK)`` over a runtime bound fails there. Applied only when
this numpy refuses that conversion.
"""
from __future__ import annotations

import os


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def use_interpreter() -> bool:
    """Turn the interpreter on for this process when no CUDA device is visible (an explicit
    ``TRITON_INTERPRET`` already in the environment is kept); returns whether it is on."""
    if not cuda_visible():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    on = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    if on:
        _backport_scalar_index()
    return on


def _numpy_refuses_one_element_int() -> bool:
    import numpy as np

    try:
        int(np.array([1], dtype=np.int32))
    except TypeError:
        return True
    return False


def _backport_scalar_index() -> None:
    if not _numpy_refuses_one_element_int():
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the kernel tests skip
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "megapmp_backport", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        # what triton's later interpreter does: the scalar's array has one element, whatever its shape
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.megapmp_backport = True
    interpreter._patch_lang_tensor = patched
