"""Triton kernels of megapmp, installed as `megapmp_kernels` (never a top-level `kernels`).

Every kernel file keeps its torch reference beside it; importing this package never requires triton.
"""
