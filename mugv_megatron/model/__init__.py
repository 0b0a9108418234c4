"""MUG-DiT on megatron.core: layer spec and submodules, embedders, 3D RoPE, the model and its builders."""
