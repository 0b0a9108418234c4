"""A small per-frame PatchGAN discriminator for the final VAE training stage (hinge loss).

Three stride-2 4×4 convolutions with leaky ReLU, then a 3×3 conv to one logit per patch: the
receptive field is local (~46 px), so it judges texture, which is what the adversarial term is
for. It is not part of the released checkpoint and is only built when `loss.gan > 0`.
"""

from __future__ import annotations

import jax
from flax import nnx


class PatchDiscriminator(nnx.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), *, rngs: nnx.Rngs):
        layers, cin = [], 3
        for c in widths:
            layers.append(nnx.Conv(cin, c, (4, 4), strides=(2, 2), padding="SAME", rngs=rngs))
            cin = c
        self.layers = nnx.List(layers)
        self.head = nnx.Conv(cin, 1, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, frames: jax.Array) -> jax.Array:
        """Frames [N, H, W, 3] in [−1, 1] → patch logits [N, H/8, W/8, 1]."""
        x = frames
        for layer in self.layers:
            x = jax.nn.leaky_relu(layer(x), 0.2)
        return self.head(x)
