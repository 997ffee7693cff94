"""Compiler passes: each is a named function `(graph, cfg) -> graph` that rewrites the IR in place.

Front half (model-level rewrites): lora -> precision -> autodiff -> recompute -> fuse_lora_merge
-> fuse_add_rmsnorm -> fuse_rmsnorm_rope -> chunking.
The memory half (offload, zero, optimizer, schedule, liveness, buffers) lives beside them.
"""
