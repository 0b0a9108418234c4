"""Sample video latents from a DiT checkpoint and saved caption features.

    python -m mugv_jax.sample --checkpoint=dit.safetensors \
        --text=features.safetensors --num_frames=105 --height=1280 --width=720 \
        --out=latents.safetensors

--model defaults to the config stored in the checkpoint, else the one its tensor shapes describe.
--text is a safetensors file with `y` [1, 1, L, D] and `mask` [1, L] (the prompt's text-encoder
features; `python -m mugv_data text` writes it, mugv/io/text_features.py) and optionally
`neg_y`/`neg_mask` (a negative prompt, as the release samples). Without
a negative prompt the unconditional branch of classifier-free guidance gets the null caption the
model was trained with (rows [:L], all valid): from --null_text, else from the sidecar next to
the checkpoint (`dit.safetensors.null_text.safetensors` beside `dit.safetensors`, written by the exporters;
mugv/io/null_text.py). If neither exists the command stops and names both; --zero_null_text opts
into a zero caption instead (which no mugv-trained model saw). --cond_latent (optional) holds
`z` [1, C, 1, h, w]: the image-to-video reference latent, kept clean as frame 0. The result,
`latents` [1, C, T, h, w] with its pixel size and fps (mugv/io/latents.py), is written
atomically; `python -m mugv_jax.vae decode` turns it into an mp4.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "release-layout DiT checkpoint (.safetensors or .pt)")
flags.DEFINE_string(
    "model",
    None,
    "model preset (mugv.config.PRESETS); default: the checkpoint's stored config, else detected from its shapes",
)
flags.DEFINE_string("text", None, "safetensors with y, mask[, neg_y, neg_mask]")
flags.DEFINE_string(
    "null_text",
    None,
    "the model's trained null caption [max_text_tokens, D] (.safetensors "
    "with 'null_text', or .npy); default: the sidecar next to --checkpoint",
)
flags.DEFINE_bool(
    "zero_null_text",
    False,
    "without a negative prompt, use a zero caption (all rows valid) "
    "as the unconditional input instead of the trained null caption",
)
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
flags.DEFINE_string(
    "compilation_cache",
    None,
    "JAX persistent compilation cache directory, or 'off' (default: $MUGV_COMPILATION_CACHE, "
    "else JAX's own setting, else ~/.cache/mugv/jax)",
)
flags.mark_flags_as_required(["checkpoint", "text"])


def unconditional_input(
    text: dict, *, text_path: str, checkpoint: str, null_text: str | None, zeros: bool, text_dim: int
) -> tuple:
    """(neg_y [1, 1, L, D], neg_mask [1, L], what it is) for the guidance's unconditional branch.

    A negative prompt in --text wins; otherwise the trained null caption from --null_text or the
    checkpoint's sidecar; zeros only when asked for. Anything ambiguous or missing is an error."""
    import numpy as np

    from mugv.io import null_text as null_lib
    from mugv_jax.sample import sampler

    y = text["y"]
    has_neg = [k for k in ("neg_y", "neg_mask") if k in text]
    if has_neg:
        if len(has_neg) == 1:
            raise app.UsageError(
                f"--text {text_path}: has {has_neg[0]} without {'neg_mask' if has_neg[0] == 'neg_y' else 'neg_y'}"
            )
        if null_text or zeros:
            raise app.UsageError(
                f"--text {text_path} holds a negative prompt (neg_y/neg_mask), and "
                f"{'--null_text' if null_text else '--zero_null_text'} names another "
                f"unconditional input: give one"
            )
        return text["neg_y"], text["neg_mask"], "the negative prompt in --text"
    if null_text and zeros:
        raise app.UsageError("--null_text and --zero_null_text both name the unconditional input: give one")
    if zeros:
        return np.zeros_like(y), np.ones(y.shape[:1] + y.shape[2:3], np.int32), "a zero caption (--zero_null_text)"
    sidecar = null_lib.sidecar_path(checkpoint)
    path = null_text or null_lib.existing_sidecar(checkpoint)
    if path is None:
        raise app.UsageError(
            f"no unconditional input for classifier-free guidance: --text {text_path} has no negative "
            f"prompt (neg_y/neg_mask), --null_text was not given, and the checkpoint has no null-caption "
            f"sidecar ({sidecar} does not exist). Give --null_text=FILE (the training run's null caption), "
            f"add neg_y/neg_mask to --text, or pass --zero_null_text to use zeros"
        )
    try:
        null = null_lib.load(path, text_dim=text_dim)
        neg_y, neg_mask = sampler.null_caption_input(null, y.shape[2])
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(f"{'--null_text' if null_text else 'null-caption sidecar'}: {e}") from None
    return neg_y, neg_mask, f"the trained null caption from {path}"


def checkpoint_config(path: str, model: str | None):
    """(DiTConfig, where it came from): --model, else the checkpoint's stored config, else the
    one its tensor shapes describe (headers only: nothing is read before the text is checked)."""
    from mugv.config import get_config
    from mugv.io.release import ReleaseReader
    from mugv.schema import detect_config, preset_name

    if model:
        return get_config(model), f"--model={model}"
    if not os.path.exists(path):
        raise app.UsageError(f"--checkpoint {path} does not exist")
    with ReleaseReader(path) as reader:
        if reader.stored_config is not None:
            return reader.stored_config, "config stored in the checkpoint"
        config = detect_config(reader.entries())
    return config, f"config detected from the shapes: {preset_name(config) or 'custom'}"


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mugv.geometry import latent_shape
    from mugv.io import latents as latents_file
    from mugv.io import text_features
    from mugv.safetensors_io import load_tensors
    from mugv.schema import preset_name
    from mugv_jax import compilation_cache, dit
    from mugv_jax.sample import sampler

    compilation_cache.setup(compilation_cache.user_cache_dir(), FLAGS.compilation_cache)

    # Text and the unconditional input first: a missing null caption is reported before minutes
    # of loading a 10B checkpoint.
    config, origin = checkpoint_config(FLAGS.checkpoint, FLAGS.model)
    text_dim = config.text_dim
    text = text_features.read(FLAGS.text)
    y, mask = text["y"], text["mask"]
    if y.ndim != 4 or y.shape[0] != 1 or y.shape[-1] != text_dim:
        raise app.UsageError(f"--text {FLAGS.text}: y must be [1, 1, L, {text_dim}], got {list(y.shape)}")
    neg_y, neg_mask, uncond = unconditional_input(
        text,
        text_path=FLAGS.text,
        checkpoint=FLAGS.checkpoint,
        null_text=FLAGS.null_text,
        zeros=FLAGS.zero_null_text,
        text_dim=text_dim,
    )
    print(f"unconditional input: {uncond}", file=sys.stderr)

    options = dit.RuntimeOptions(compute_dtype=jnp.dtype(FLAGS.dtype))
    t0 = time.time()
    model = dit.load(FLAGS.checkpoint, config, options=options, progress=True)
    print(f"loaded {FLAGS.checkpoint} ({origin}) in {time.time() - t0:.1f}s", file=sys.stderr)

    micro = FLAGS.micro_frame_size or None
    t_lat, h_lat, w_lat = latent_shape(FLAGS.num_frames, FLAGS.height, FLAGS.width, micro)
    shape = (1, model.config.in_channels, t_lat, h_lat, w_lat)
    key = jax.random.PRNGKey(FLAGS.seed)
    z = jnp.zeros(shape, jnp.float32)
    frame_mask = jnp.ones((1, t_lat), jnp.float32)
    if FLAGS.cond_latent:
        ref = load_tensors(FLAGS.cond_latent, ("z",), what="--cond_latent")["z"]
        if ref.shape != (1, model.config.in_channels, 1, h_lat, w_lat):
            raise app.UsageError(
                f"--cond_latent {FLAGS.cond_latent}: z must be "
                f"{[1, model.config.in_channels, 1, h_lat, w_lat]}, got {list(ref.shape)}"
            )
        z = z.at[:, :, :1].set(ref)
        frame_mask = frame_mask.at[:, 0].set(0.0)
    print(f"sampling latents {list(shape)} ({FLAGS.steps} steps, cfg {FLAGS.cfg_scale})", file=sys.stderr)
    out = sampler.sample(
        model,
        z,
        y,
        mask,
        neg_y,
        neg_mask,
        height=FLAGS.height,
        width=FLAGS.width,
        num_steps=FLAGS.steps,
        guidance_scale=FLAGS.cfg_scale,
        frame_mask=frame_mask,
        key=key,
        fps=FLAGS.fps,
        round_shift_to_bf16=FLAGS.bf16_shift,
        progress=True,
        shift=FLAGS.shift,
    )
    out = np.asarray(out)
    if not np.all(np.isfinite(out)):
        raise RuntimeError("sampling produced non-finite latents; nothing was written")
    latents_file.write(
        FLAGS.out,
        out,
        {
            "num_frames": FLAGS.num_frames,
            "height": FLAGS.height,
            "width": FLAGS.width,
            "fps": FLAGS.fps,
            "model": preset_name(config) or "custom",
            "checkpoint": os.path.abspath(FLAGS.checkpoint),
            "steps": FLAGS.steps,
            "cfg_scale": FLAGS.cfg_scale,
            "seed": FLAGS.seed,
        },
    )
    print(f"wrote {FLAGS.out}: latents {list(out.shape)}, mean {out.mean():+.4f}, std {out.std():.4f}")
