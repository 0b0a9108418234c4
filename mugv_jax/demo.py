"""The main job on the bundled default data (until the data pipeline and report land):

1. train the tiny MUG-DiT with the real trainer on caption-dependent synthetic latents
   (checkpoints, TensorBoard logs in <workdir>),
2. export the EMA weights to the release layout (<workdir>/dit_ema.safetensors) and load them back
   through the public loader,
3. sample latents for every caption with classifier-free guidance (the null caption as negative),
4. report how close each sample is to every caption's training latents: a model that learned
   puts each sample nearest its own caption's pattern.

    python -m mugv_jax.demo --workdir=outputs/main [--config.num_steps=300]
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"),
                                "training config", lock_config=True)
flags.DEFINE_string("workdir", "outputs/main", "run directory")
flags.DEFINE_integer("sample_steps", 25, "Euler steps per sample")
flags.DEFINE_float("cfg_scale", 2.0, "guidance scale (negative = the null caption)")
FLAGS = flags.FLAGS


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = np.asarray(v)
    return out


def run(config, workdir: str, sample_steps: int = 25, cfg_scale: float = 2.0) -> dict:
    import jax

    from mugv_jax import dit, sampler
    from mugv_jax import train as train_lib
    from mugv_jax.dit.checkpoint import model_from_params
    from mugv_jax.safetensors_io import save_atomic

    t0 = time.time()
    summary = train_lib.train(config, workdir)
    model_cfg = train_lib.model_config_from(config)
    ema = _flatten(jax.device_get(summary["state"]["ema"]))
    null_text = np.asarray(jax.device_get(summary["state"]["null_text"]))
    release_path = os.path.join(workdir, "dit_ema.safetensors")
    save_atomic(dit.export_release_state_dict(model_from_params(model_cfg, ema)), release_path,
                metadata={"model": config.model, "step": str(summary["step"])})
    model = dit.load(release_path, model_cfg)  # what a user of the exported file gets
    print(f"trained {summary['step']} steps in {time.time() - t0:.0f}s; exported {release_path}", file=sys.stderr)

    source = train_lib.build_source(config, model_cfg)
    bucket = source.buckets[0]
    patterns = source.patterns(bucket)  # [prompts, C, F, H, W]
    f, h, w = bucket.latent_shape
    neg_y = null_text[None, None, : source.text_len]
    neg_mask = np.ones((1, source.text_len), np.int32)
    rows = []
    for k in range(source.num_prompts):
        z = sampler.sample(model, np.zeros((1, model_cfg.in_channels, f, h, w), np.float32),
                           source.text[k][None, None], source.text_mask[k][None], neg_y, neg_mask,
                           height=h * 8, width=w * 8, num_steps=sample_steps, guidance_scale=cfg_scale,
                           key=jax.random.PRNGKey(100 + k), fps=source.fps, shift=config.objective.shift_ratio)
        dists = np.sqrt(np.mean((np.asarray(z)[0][None] - patterns) ** 2, axis=(1, 2, 3, 4)))
        rows.append({"prompt": k, "nearest": int(np.argmin(dists)), "rms_to_own": float(dists[k]),
                     "rms_to_others": float(np.mean(np.delete(dists, k)))})
    correct = sum(r["nearest"] == r["prompt"] for r in rows)
    report = {"steps": summary["step"], "final_loss": summary["loss"],
              "constant_baseline_loss": source.constant_baseline_loss(bucket),
              "prompts_nearest_own_pattern": f"{correct}/{len(rows)}", "samples": rows,
              "exported": release_path}
    with open(os.path.join(workdir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    lines = [f"# mugv main job — {summary['step']} steps of {config.model}",
             f"final loss {summary['loss']:.4f} (best caption-blind constant: {report['constant_baseline_loss']:.4f})",
             f"samples nearest their own caption's latents: {correct}/{len(rows)}",
             "", "| prompt | nearest pattern | RMS to own | mean RMS to others |", "|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['nearest']} | {r['rms_to_own']:.3f} | {r['rms_to_others']:.3f} |" for r in rows]
    with open(os.path.join(workdir, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def main(argv):
    del argv
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    run(FLAGS.config, FLAGS.workdir, FLAGS.sample_steps, FLAGS.cfg_scale)


if __name__ == "__main__":
    app.run(main)
