"""Triton kernels of megapmp, imported as `megapmp_kernels` (never a top-level `kernels`).

The package lives in kernels/megapmp_kernels/ so that nothing in kernels/ is importable as `kernels`
(Hugging Face's package of that name, which transformers imports, must win). From a checkout without
`pip install -e .`, put both the root and kernels/ on the path: PYTHONPATH=$PWD:$PWD/kernels.

Every kernel file keeps its torch reference beside it; importing this package never requires triton.

    pair_loss   fused packed-pair loss (LM cross-entropy without [tokens x vocab] logits + pairwise
                reward log-sigmoid): ``from megapmp_kernels import fused_pair_loss``
"""
import importlib


def __getattr__(name):  # lazy: `import megapmp_kernels` stays free of torch / triton imports
    if name == "fused_pair_loss":
        return importlib.import_module("megapmp_kernels.pair_loss").fused_pair_loss
    raise AttributeError(f"module 'megapmp_kernels' has no attribute {name!r}")
