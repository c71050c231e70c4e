"""Parallelism for megapmp, applied from outside to the single-device model.

topology        ParallelDims (rank matrix, validation) -> ParallelContext (explicit process groups);
                process-group start-up from torchrun, this process's device
collectives     paired autograd collectives over an explicit group
tensor_parallel column / row / vocab-parallel layers (the vocab-parallel CE is megapmp_kernels.fused_pair_loss's), GQA sharding rules
parallelize     parallelize_model (TP + sequence parallel by module name), TP gradient completion
schedules, pipeline*  pipeline parallelism
data_parallel   bucketed, backward-overlapped DP gradient all-reduce; ZeRO-1 distributed AdamW
engine          Engine: one optimizer step on any layout (forward_backward -> StepSums, finish_grads,
                clip_grad_norm, optimizer_step, checkpoint state); this rank's chunks from the full model
memory          per-rank memory estimate of a layout (the launch scripts print it)

Submodules are imported explicitly (``from megapmp.parallel.topology import ParallelDims``).
"""
