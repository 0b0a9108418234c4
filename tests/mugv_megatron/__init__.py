"""The Megatron-Core backend: model parity and layouts, TP/SP/CP/PP, trainer, optimizer, checkpoints."""
