"""Data-parallel execution of a plan made for several ranks (ZeRO 1/2/3).

- `comm`: this process's rank, world and the few collectives the training loop needs (loss and token
  counts, gradient norms, decisions, checkpoint and export gathering).
- `launch`: start one worker process per rank on this node (or join a world torchrun started).
- `worker`: the entry point of one such process.
- `shards`: a rank's slice of a full tensor, and full tensors back from the ranks' shards.
- `optim_slices`: optimizer-step ops that update this rank's slice (ZeRO-1/2/3).
- `state`: checkpoints of a multi-rank run (every rank's shards, in one atomic checkpoint folder).
- `reshard`: resume a checkpoint written with another rank count or ZeRO layout.
- `ray_launch`: `distributed.num_nodes > 1`, one worker group per node, placed by Ray.

torch.distributed with gloo on the cpu backend (`gpus: N` emulated by N CPU processes) and NCCL on cuda.
"""
