"""One definition of a training step's random numbers, for every backend.

Both trainers must draw the same timesteps, noise, conditioning frames and caption drops for the
same (seed, step, sample), so that a stage run on Megatron equals the same stage run on JAX and a
run can move between them mid-way. Framework generators (jax.random, torch, numpy) cannot give
that, so the draws are defined here as a counter-based function — Threefry-2x32 with 20 rounds
(Salmon et al., SC'11; the function JAX's default PRNG is built on) — of

    key     = (seed, step)                         two 32-bit words
    counter = (tag · 2^24 + global sample index,   which quantity, which row of the global batch
               element index within the sample)    flat C-order index, e.g. over [C, T, H, W]

Each backend evaluates the same integer function (`mugv_jax.train.rng`, `mugv_megatron.train.rng`; this
numpy version is the reference the tests hold them to), so bits agree exactly everywhere. A
sample's numbers depend only on its global index, never on which device or rank draws it: a
data-parallel rank draws its own rows only, and gradient accumulation, resharding or resuming
cannot change the math.

Derived values (all float32):
  uniform(x)  = ((x >> 9) + 0.5) · 2^-23            in (0, 1), exact in float32
  normal      = sqrt(−2 ln u(x0)) · cos(2π u(x1))   Box–Muller on the two output words; the only
                                                     value that differs across backends, by the
                                                     last bits of their log/cos (≈1e-7 relative)
  randint(n)  = ((x0 >> 8) · n) >> 24               in [0, n), exact integer math, n < 256
  bernoulli(p)= uniform(x0) < p
"""

from __future__ import annotations

import numpy as np

MASK32 = 0xFFFFFFFF
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
KEY_PARITY = 0x1BD11BDA
ROW_BITS = 24
MAX_ROWS = 1 << ROW_BITS  # global batch rows a step can address
MAX_RANGE = 256  # randint's exclusive upper bound

# What each counter's tag draws. New quantities take new tags; existing ones never change.
TAG_T = 1  # pretraining: logit-normal base u of the timestep (normal)
TAG_NOISE = 2  # pretraining: noise ε [C, T, H, W] (normal)
TAG_I2V_APPLY = 3  # pretraining: does the sample get conditioning frames (bernoulli)
TAG_I2V_FRAMES = 4  # pretraining: how many ("quarter" mode; randint)
TAG_CAPTION_DROP = 5  # pretraining: caption replaced by the null text (bernoulli)
TAG_PREF_T = 6  # preference: logit-normal base of the timestep (normal)
TAG_PREF_NOISE = 7  # preference: noise shared by a pair's winner and loser (normal)
TAG_NULL_TEXT = 8  # the null caption features (normal; key = (seed, 0))


def threefry2x32(k0: int, k1: int, c0: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32-20 of counters (c0, c1) under key (k0, k1), elementwise (uint32 arrays)."""
    k0, k1 = np.uint64(int(k0) & MASK32), np.uint64(int(k1) & MASK32)
    ks = (k0, k1, k0 ^ k1 ^ np.uint64(KEY_PARITY))
    m = np.uint64(MASK32)
    x0 = (np.asarray(c0, np.uint64) + ks[0]) & m
    x1 = (np.asarray(c1, np.uint64) + ks[1]) & m
    for group in range(5):
        for r in ROTATIONS[group % 2]:
            x0 = (x0 + x1) & m
            x1 = ((x1 << np.uint64(r)) | (x1 >> np.uint64(32 - r))) & m
            x1 = x1 ^ x0
        x0 = (x0 + ks[(group + 1) % 3]) & m
        x1 = (x1 + ks[(group + 2) % 3] + np.uint64(group + 1)) & m
    return x0.astype(np.uint32), x1.astype(np.uint32)


def check_rows(rows, what: str = "global batch") -> None:
    rows = np.asarray(rows)
    if rows.size and (rows.min() < 0 or rows.max() >= MAX_ROWS):
        raise ValueError(f"{what}: sample index {int(rows.max())} is outside the {MAX_ROWS} rows a step can draw for")


def bits(seed: int, step: int, tag: int, rows, elements: int) -> tuple[np.ndarray, np.ndarray]:
    """The two output words for `rows` (global sample indices) × `elements` per sample."""
    rows = np.asarray(rows, np.uint64).reshape(-1, 1)
    check_rows(rows)
    c0 = (np.uint64(tag) << np.uint64(ROW_BITS)) | rows
    c1 = np.arange(elements, dtype=np.uint64).reshape(1, -1)
    c0, c1 = np.broadcast_arrays(c0, c1)
    return threefry2x32(seed, step, c0, c1)


def uniform(x: np.ndarray) -> np.ndarray:
    return ((x >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)


def normal(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    radius = np.sqrt(np.float32(-2.0) * np.log(uniform(x0)))
    return (radius * np.cos(np.float32(2.0 * np.pi) * uniform(x1))).astype(np.float32)


def randint(x0: np.ndarray, n: int) -> np.ndarray:
    if not 0 < n <= MAX_RANGE:
        raise ValueError(f"randint range must be in 1..{MAX_RANGE}, got {n}")
    return (((x0 >> np.uint32(8)).astype(np.uint64) * np.uint64(n)) >> np.uint64(24)).astype(np.int64)


# --- the draws of a step (reference versions) --------------------------------------------------


def normals(seed: int, step: int, tag: int, rows, shape: tuple[int, ...]) -> np.ndarray:
    """[len(rows), *shape] standard normals."""
    n = int(np.prod(shape)) if shape else 1
    x0, x1 = bits(seed, step, tag, rows, n)
    return normal(x0, x1).reshape((len(np.atleast_1d(rows)), *shape))


def uniforms(seed: int, step: int, tag: int, rows) -> np.ndarray:
    x0, _ = bits(seed, step, tag, rows, 1)
    return uniform(x0)[:, 0]


def randints(seed: int, step: int, tag: int, rows, n: int) -> np.ndarray:
    x0, _ = bits(seed, step, tag, rows, 1)
    return randint(x0, n)[:, 0]


def null_text(seed: int, max_text_tokens: int, text_dim: int) -> np.ndarray:
    """The null caption features a fresh run starts with: N(0, 1/text_dim), [max_tokens, dim]."""
    z = normals(seed, 0, TAG_NULL_TEXT, np.arange(max_text_tokens), (text_dim,))
    return (z / np.float32(np.sqrt(text_dim))).astype(np.float32)


def pretrain_draws(
    seed: int,
    step: int,
    rows,
    latent_shape: tuple[int, int, int, int],
    *,
    i2v_prob: float,
    i2v_mode: str,
    caption_dropout_prob: float,
) -> dict[str, np.ndarray]:
    """Every random number of a pretraining step for the given global rows; `latent_shape` is one
    sample's [C, T, H, W]. Keys: u [B] (timestep base), eps [B, C, T, H, W], n_cond [B]
    (clean leading frames), drop [B] (caption replaced by the null text)."""
    rows = np.atleast_1d(np.asarray(rows))
    frames = latent_shape[1]
    apply = uniforms(seed, step, TAG_I2V_APPLY, rows) < np.float32(i2v_prob)
    if i2v_mode == "first":
        n_cond = np.ones(len(rows), np.int64)
    else:
        n_cond = 1 + randints(seed, step, TAG_I2V_FRAMES, rows, max(1, frames // 4))
    n_cond = np.where(apply, np.minimum(n_cond, frames - 1 if frames > 1 else 0), 0)
    return {
        "u": normals(seed, step, TAG_T, rows, ()),
        "eps": normals(seed, step, TAG_NOISE, rows, tuple(latent_shape)),
        "n_cond": n_cond.astype(np.int64),
        "drop": uniforms(seed, step, TAG_CAPTION_DROP, rows) < np.float32(caption_dropout_prob),
    }
