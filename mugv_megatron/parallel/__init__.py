"""Megatron parallel state (TP/SP/CP/PP set-up, the CPU shim), context parallelism and the pipeline-parallel
schedule."""
