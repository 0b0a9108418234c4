"""Sample video latents from a DiT checkpoint and saved caption features.

    python -m mugv_jax.sample --checkpoint=dit.safetensors --model=10b \
        --text=features.safetensors --num_frames=105 --height=1280 --width=720 \
        --out=latents.safetensors

--text is a safetensors file with `y` [1, 1, L, D] and `mask` [1, L] (the prompt's text-encoder
features) and, for classifier-free guidance, `neg_y`/`neg_mask` (the negative prompt; absent =
a zero caption). --cond_latent (optional) holds `z` [1, C, 1, h, w]: the image-to-video
reference latent, kept clean as frame 0. The result, `latents` [1, C, T, h, w], is written
atomically; decode it with the VAE.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "release-layout DiT checkpoint (.safetensors or .pt)")
flags.DEFINE_string("model", "10b", "model preset (mugv.config.PRESETS)")
flags.DEFINE_string("text", None, "safetensors with y, mask[, neg_y, neg_mask]")
flags.DEFINE_string("cond_latent", None, "optional safetensors with z [1,C,1,h,w]: image-to-video reference")
flags.DEFINE_string("out", "outputs/latents.safetensors", "where to write the sampled latents")
flags.DEFINE_integer("num_frames", 105, "pixel frames of the video (latent frames follow the VAE)")
flags.DEFINE_integer("height", 1280, "pixel height")
flags.DEFINE_integer("width", 720, "pixel width")
flags.DEFINE_integer("micro_frame_size", 48, "VAE temporal chunk (pixel frames); 0 = whole clip")
flags.DEFINE_integer("steps", 25, "Euler steps")
flags.DEFINE_float("cfg_scale", 4.0, "classifier-free guidance scale")
flags.DEFINE_float("fps", 30.0, "fps conditioning value (the release samples with 30)")
flags.DEFINE_integer("seed", 42, "noise seed")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_bool("bf16_shift", False, "round the timestep-shift ratio to bf16 like the release")
flags.DEFINE_float("shift", None, "fixed timestep-shift ratio (default: the resolution/length rule)")
flags.mark_flags_as_required(["checkpoint", "text"])


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mugv.geometry import latent_shape
    from mugv_jax import dit, sampler
    from mugv.safetensors_io import load_tensors, save_atomic

    options = dit.RuntimeOptions(compute_dtype=jnp.dtype(FLAGS.dtype))
    t0 = time.time()
    model = dit.load(FLAGS.checkpoint, FLAGS.model, options=options, progress=True)
    print(f"loaded {FLAGS.checkpoint} ({FLAGS.model}) in {time.time() - t0:.1f}s", file=sys.stderr)

    text = load_tensors(FLAGS.text, ("y", "mask"), what="--text features")
    y, mask = text["y"], text["mask"]
    if y.ndim != 4 or y.shape[0] != 1 or y.shape[-1] != model.config.text_dim:
        raise app.UsageError(f"--text {FLAGS.text}: y must be [1, 1, L, {model.config.text_dim}], "
                             f"got {list(y.shape)}")
    neg_y = text.get("neg_y", np.zeros_like(y))
    neg_mask = text.get("neg_mask", np.ones_like(mask))

    micro = FLAGS.micro_frame_size or None
    t_lat, h_lat, w_lat = latent_shape(FLAGS.num_frames, FLAGS.height, FLAGS.width, micro)
    shape = (1, model.config.in_channels, t_lat, h_lat, w_lat)
    key = jax.random.PRNGKey(FLAGS.seed)
    z = jnp.zeros(shape, jnp.float32)
    frame_mask = jnp.ones((1, t_lat), jnp.float32)
    if FLAGS.cond_latent:
        ref = load_tensors(FLAGS.cond_latent, ("z",), what="--cond_latent")["z"]
        if ref.shape != (1, model.config.in_channels, 1, h_lat, w_lat):
            raise app.UsageError(f"--cond_latent {FLAGS.cond_latent}: z must be "
                                 f"{[1, model.config.in_channels, 1, h_lat, w_lat]}, got {list(ref.shape)}")
        z = z.at[:, :, :1].set(ref)
        frame_mask = frame_mask.at[:, 0].set(0.0)
    print(f"sampling latents {list(shape)} ({FLAGS.steps} steps, cfg {FLAGS.cfg_scale})", file=sys.stderr)
    out = sampler.sample(model, z, y, mask, neg_y, neg_mask, height=FLAGS.height, width=FLAGS.width,
                         num_steps=FLAGS.steps, guidance_scale=FLAGS.cfg_scale, frame_mask=frame_mask,
                         key=key, fps=FLAGS.fps, round_shift_to_bf16=FLAGS.bf16_shift, progress=True,
                         shift=FLAGS.shift)
    out = np.asarray(out)
    if not np.all(np.isfinite(out)):
        raise RuntimeError("sampling produced non-finite latents; nothing was written")
    save_atomic({"latents": out}, FLAGS.out, metadata={
        "checkpoint": os.path.abspath(FLAGS.checkpoint), "model": FLAGS.model, "steps": str(FLAGS.steps),
        "cfg_scale": str(FLAGS.cfg_scale), "seed": str(FLAGS.seed),
        "pixel_size": f"{FLAGS.num_frames}x{FLAGS.height}x{FLAGS.width}"})
    print(f"wrote {FLAGS.out}: latents {list(out.shape)}, mean {out.mean():+.4f}, std {out.std():.4f}")


if __name__ == "__main__":
    app.run(main)
