"""VAE training objective and image metrics (docs/reference.md §6.6), on channels-last video [B, T, H, W, 3].

L = w_mse·MSE + w_l1·ℓ1_w + w_p·L_perc + λ·KL (+ γ·L_GAN in the final stage), where ℓ1_w is the
ℓ1 term weighted per pixel by the adaptive saliency |Δ_t ∇² x̂_t| (temporal forward difference of
the Laplacian of the *reconstructed* frame, detached, normalised to mean 1 per clip) once
training has stabilised (`saliency` in [0, 1] blends it in).

Perceptual term: the paper uses a pretrained feature network (LPIPS-style). None can be
downloaded here, so this is a fixed, parameter-free stand-in: at three scales (1, ½, ¼) the ℓ1
distance of horizontal/vertical image gradients plus 1 − SSIM. It rewards sharp edges and local
structure like a feature loss does, but it knows nothing about semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Rec. 601 luma of an RGB image.
_LUMA = jnp.array([0.299, 0.587, 0.114], jnp.float32)


def _frames(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[-3:])


def _box(x: jax.Array, k: int) -> jax.Array:
    """Mean over k×k windows (valid) of [N, H, W, C]."""
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k, 1), (1, 1, 1, 1), "VALID") / (k * k)


def _pool2(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def ssim_map(a: jax.Array, b: jax.Array, window: int = 7) -> jax.Array:
    """SSIM of images in [0, 1] ([N, H, W, C]), uniform `window`×`window` (skimage's default)."""
    c1, c2 = 0.01**2, 0.03**2
    k = min(window, a.shape[1], a.shape[2])
    mu_a, mu_b = _box(a, k), _box(b, k)
    # Sample (unbiased) variances, as skimage computes them.
    cov = k * k / (k * k - 1) if k > 1 else 1.0
    va = cov * (_box(a * a, k) - mu_a * mu_a)
    vb = cov * (_box(b * b, k) - mu_b * mu_b)
    vab = cov * (_box(a * b, k) - mu_a * mu_b)
    return ((2 * mu_a * mu_b + c1) * (2 * vab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of videos in [−1, 1] (measured on [0, 1], reconstruction clipped), per clip."""
    a = (jnp.clip(x, -1, 1) + 1) / 2
    b = (jnp.clip(y, -1, 1) + 1) / 2
    mse = jnp.mean((a - b) ** 2, axis=tuple(range(1, x.ndim)))
    return 10 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean SSIM per clip of videos in [−1, 1] ([B, T, H, W, 3])."""
    a = _frames((jnp.clip(x, -1, 1) + 1) / 2)
    b = _frames((jnp.clip(y, -1, 1) + 1) / 2)
    s = ssim_map(a, b).reshape(x.shape[0], -1)
    return s.mean(axis=1)


def perceptual(x: jax.Array, y: jax.Array, scales: int = 3) -> jax.Array:
    """The offline perceptual stand-in: multi-scale gradient ℓ1 + (1 − SSIM)."""
    a, b = _frames((x + 1) / 2), _frames((y + 1) / 2)
    total = 0.0
    for s in range(scales):
        if s:
            a, b = _pool2(a), _pool2(b)
        if min(a.shape[1], a.shape[2]) < 3:
            break
        for axis in (1, 2):
            total = total + jnp.mean(jnp.abs(jnp.diff(a, axis=axis) - jnp.diff(b, axis=axis)))
        total = total + jnp.mean(1 - ssim_map(a, b))
    return total


def laplacian(gray: jax.Array) -> jax.Array:
    """5-point Laplacian of [N, H, W] with edge replication."""
    p = jnp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * gray


def saliency(y: jax.Array) -> jax.Array:
    """|Δ_t ∇² ŷ_t| per pixel [B, T, H, W], normalised to mean 1 per clip, no gradient.

    The forward difference has no successor for the last frame, which reuses the previous one's
    weight; a one-frame clip gets uniform weights.
    """
    y = jax.lax.stop_gradient(y)
    b, t, h, w, _ = y.shape
    lap = laplacian((y @ _LUMA).reshape(b * t, h, w)).reshape(b, t, h, w)
    if t == 1:
        return jnp.ones((b, t, h, w), jnp.float32)
    d = jnp.abs(jnp.diff(lap, axis=1))
    d = jnp.concatenate([d, d[:, -1:]], axis=1)
    return d / (jnp.mean(d, axis=(1, 2, 3), keepdims=True) + 1e-6)


def kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, e^logvar) ‖ N(0, 1)), averaged over latent elements."""
    return 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)


CONTRAST_SATURATION = 0.5  # summed |RGB| distance (of 6 on the [−1, 1] scale) at full weight


def contrast(x: jax.Array, dilate: int = 0) -> jax.Array:
    """Per-pixel weight of the *target* [B, T, H, W, 3]: its ℓ1 distance from the frame's median
    colour, saturating at CONTRAST_SATURATION (so a dim green object weighs as much as a white
    one), normalised to mean 1 per frame; no gradient. High on whatever stands out from the
    background. `dilate` = r > 0 max-pools that distance over the (2r+1)² pixels around each pixel
    first, so a one-pixel ring around the object weighs as much as the object (r = 1)."""
    if dilate < 0:
        raise ValueError(f"loss.contrast_dilate must be >= 0 pixels, got {dilate}")
    x = jax.lax.stop_gradient(x)
    b, t, h, w, c = x.shape
    med = jnp.median(x.reshape(b, t, h * w, c), axis=2)[:, :, None, None]
    d = jnp.minimum(jnp.sum(jnp.abs(x - med), axis=-1) / CONTRAST_SATURATION, 1.0)
    if dilate:
        # The object's surround weighs as much as the object: weighting only the target's own
        # object pixels lets a reconstruction bleed the object's colour one pixel outwards at a
        # small fraction of the cost of losing an object pixel (1/17 for the main job's 8-px
        # shapes), and the VAE learns dilated blobs.
        k = 2 * int(dilate) + 1
        d = jax.lax.reduce_window(d, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, 1, 1), "SAME")
    return d / (jnp.mean(d, axis=(2, 3), keepdims=True) + 1e-6)


def reconstruction(x: jax.Array, y: jax.Array, weights, saliency_mix: jax.Array) -> dict[str, jax.Array]:
    """The terms of L_rec (unweighted) and their weighted sum under "rec".

    `weights.contrast` = c > 0 weights every pixel of the MSE and ℓ1 terms by 1 + c·contrast(x):
    a small object on a plain background (the main job's procedural clips: 6 % of the pixels)
    then carries about c/(1+c) of the loss instead of 6 %, so its colour and shape are learnt in
    hundreds of steps rather than being averaged into the background.
    """
    err = y - x
    c = weights.get("contrast", 0.0) if hasattr(weights, "get") else 0.0
    dil = int(weights.get("contrast_dilate", 0)) if hasattr(weights, "get") else 0
    pw = 1.0 + c * contrast(x, dil) if c else jnp.ones(x.shape[:-1], x.dtype)
    mse = jnp.mean(err**2 * pw[..., None]) / (1.0 + c)
    w = pw * (1.0 + saliency_mix * (saliency(y) - 1.0))
    l1 = jnp.mean(jnp.abs(err) * w[..., None]) / (1.0 + c)
    perc = perceptual(x, y) if weights.perceptual else jnp.zeros(())
    rec = weights.mse * mse + weights.l1 * l1 + weights.perceptual * perc
    return {"mse": mse, "l1": l1, "perceptual": perc, "rec": rec}


def hinge_d(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.relu(1 - real_logits)) + jnp.mean(jax.nn.relu(1 + fake_logits))


def hinge_g(fake_logits: jax.Array) -> jax.Array:
    return -jnp.mean(fake_logits)
