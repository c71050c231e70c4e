"""Parallelism for megapmp, applied from outside to the single-device model.

topology        ParallelDims (rank matrix, validation) -> ParallelContext (explicit process groups)
collectives     paired autograd collectives over an explicit group
tensor_parallel column / row / vocab-parallel layers, vocab-parallel cross entropy, GQA sharding rules
parallelize     parallelize_model (TP + sequence parallel by module name), TP gradient completion
loss            parallel_pmp_loss: the PMP loss of a tensor-parallel model
schedules, pipeline*  pipeline parallelism
data_parallel   bucketed, backward-overlapped DP gradient all-reduce; ZeRO-1 distributed AdamW
runtime         the trainer's plumbing: process groups from torchrun, layout-independent model build,
                gradient completion, the global gradient norm
memory          per-rank memory estimate of a layout (the launch scripts print it)

Submodules are imported explicitly (``from megapmp.parallel.topology import ParallelDims``).
"""
