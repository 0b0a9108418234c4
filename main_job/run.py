"""The main job's stages in order; each is skipped when a previous run finished it.

data    procedural clips (held-out combinations removed) + bundled real videos → clips.npz
vae     train the small video VAE on those clips (mugv_jax.vae.training, resumable)
encode  VAE latents + MiniLM captions → array_record shards (mugv_data), prompt features
dit     train the small MUG-DiT with the real trainer on the shards (checkpoints, TensorBoard)
sample  held-out prompts: text-to-video and image-to-video → latents → decoded mp4s, checks
report  loss curves, frame grids, config, throughput → <workdir>/report.html (always rebuilt)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

from main_job import dataset, measure, media
from main_job.stages import Stages
from mugv.data.video import write_mp4
from mugv.io.atomic import write_json
from mugv.layouts.jax import flatten
from mugv.run.config import RunConfig, as_run_config

log = logging.getLogger("mugv.main_job")

ORDER = ("data", "vae", "encode", "dit", "sample")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- data -------------------------------------------------------------------------------------


def stage_data(config, stages: Stages) -> dict:
    d = stages.start("data", keep_partial=False)
    return dataset.build(config.data, int(config.seed), d)


# --- vae --------------------------------------------------------------------------------------


def _vae_train_config(config):
    """configs/vae_tiny.py with the main job's steps, clip geometry, objective and hold-out."""
    from configs import vae_tiny

    vc = vae_tiny.get_config()
    size = int(config.data.size)
    v = config.vae
    overrides = {
        "num_steps": int(v.num_steps),
        "batch_size": int(v.batch_size),
        "frames": int(v.frames),
        "size": (size, size),
        "seed": int(config.seed),
        "log_every": int(v.log_every),
        "eval_every": int(v.num_steps),
        "checkpoint_every": int(v.checkpoint_every),
        "decoder_windows": tuple(int(n) for n in v.decoder_windows),
        "init_logvar": float(v.init_logvar),
        "optim.learning_rate": float(v.learning_rate),
        "loss.contrast": float(v.contrast),
        "data.first_frame": bool(v.first_frame),
        "data.holdout_clips": int(v.holdout_clips),
        "data.eval_clips": int(v.holdout_clips),
    }
    with vc.unlocked():
        for key, value in overrides.items():
            *parents, k = key.split(".")
            node = vc
            for p in parents:
                node = node[p]
            if k not in node:
                raise KeyError(f"configs/vae_tiny.py has no field {key!r} that the main job sets")
            node[k] = value
        # The tiny preset's networks with the main job's chunking and GroupNorm grouping (the
        # weights' shapes are the tiny preset's).
        del vc["vae_preset"]
        vc.vae_preset = {
            "preset": "tiny",
            "micro_frame_size": int(v.micro_frame_size),
            "norm_num_groups": int(v.norm_num_groups),
            "temporal_num_groups": int(v.temporal_num_groups),
        }
        if v.fast_compile:
            vc.compiler_options = dict(FAST_COMPILE)
    return vc


# XLA's backend optimisation off: the small VAE's networks compile several times faster on a CPU,
# which matters more than their run time for a few dozen steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def vae_training_available() -> bool:
    return os.path.exists(os.path.join(ROOT, "mugv_jax", "vae", "training.py")) and os.path.exists(
        os.path.join(ROOT, "configs", "vae_tiny.py")
    )


def stage_vae(config, stages: Stages, clips: np.ndarray) -> dict:
    import mugv_jax.vae as vae

    d = stages.start("vae", keep_partial=True)
    if config.vae.train and vae_training_available():
        from mugv_jax.vae.training import train_vae

        result = train_vae(_vae_train_config(config), d, clips=list(clips), progress=True)
        vcfg = result["vae_config"]
        return {
            "trained": True,
            "weights": os.path.relpath(result["weights"], stages.workdir),
            "fast_compile": bool(config.vae.fast_compile),
            "vae_config": dataclasses.asdict(vcfg),
            "steps": int(result["steps"]),
            "psnr_before": float(result["psnr_before"]),
            "psnr_after": float(result["psnr_after"]),
        }
    # Fallback (config.vae.train=False, or mugv_jax.vae.training missing): a randomly initialised tiny VAE (rebuilt
    # from the seed whenever it is needed). Its latents still separate the clips (the learning
    # check works in latent space) but decoded videos are noise; the report says so.
    vcfg = vae.get_vae_config("tiny")
    return {
        "trained": False,
        "weights": None,
        "seed": int(config.seed),
        "fast_compile": bool(config.vae.fast_compile),
        "vae_config": dataclasses.asdict(vcfg),
        "steps": 0,
        "psnr_before": None,
        "psnr_after": None,
    }


def vae_config_from(record: dict):
    from mugv.vae_config import VAEConfig

    return VAEConfig(**record["vae_config"])


def load_vae(stages: Stages, record: dict):
    import mugv_jax.vae as vae

    options = dict(FAST_COMPILE) if record.get("fast_compile") else None
    if record["weights"] is None:
        from flax import nnx

        model = vae.VideoVAE(vae_config_from(record), rngs=nnx.Rngs(int(record["seed"])))
    else:
        model = vae.load(os.path.join(stages.workdir, record["weights"]), vae_config_from(record))
    return vae.jit(model, options)


def to_model_input(clips: np.ndarray) -> np.ndarray:
    """[B, T, H, W, 3] uint8 → [B, 3, T, H, W] in [−1, 1]."""
    return clips.transpose(0, 4, 1, 2, 3).astype(np.float32) / 127.5 - 1.0


def to_pixels(video) -> np.ndarray:
    """[B, 3, T, H, W] in [−1, 1] → [B, T, H, W, 3] uint8."""
    v = np.asarray(video, np.float32).transpose(0, 2, 3, 4, 1)
    return np.clip(np.rint((v + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _batched(fn, items: np.ndarray, batch: int, desc: str) -> np.ndarray:
    """fn over `items` in batches of one compiled shape: the last batch is padded with copies of
    its last item and cut again."""
    out = []
    for i in tqdm(range(0, len(items), batch), desc=desc, unit="batch"):
        chunk = items[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(fn(chunk)[:n])
    return np.concatenate(out)


def encode_batched(jv, clips: np.ndarray, batch: int, desc: str) -> np.ndarray:
    return _batched(lambda c: np.asarray(jv.encode(to_model_input(c)), np.float32), clips, batch, desc)


def padded_frames(num_frames: int) -> int:
    """Frames to ask the VAE decoder for so that dropping the first `padded − num_frames` gives
    frames 0..num_frames−1 in order: an 8k+1-frame clip was encoded with 7 copies of frame 0 in
    front (the first-frame rule), so its latents decode to 8k+8 frames. Asked for only 8k+1,
    the release's windowing (mugv_jax/vae/windows.py) crops at the front of the *last* window,
    and a clip longer than one chunk comes back as [f0 ×7, f0..f8, f16] for 17 frames."""
    from mugv_jax.vae.windows import first_frame_copies

    return num_frames + first_frame_copies(num_frames)


def decode_batched(jv, latents: np.ndarray, num_frames: int, batch: int, desc: str) -> np.ndarray:
    padded = padded_frames(num_frames)
    return _batched(
        lambda z: to_pixels(jv.decode(z, num_frames=padded))[:, padded - num_frames :], latents, batch, desc
    )


# --- encode -----------------------------------------------------------------------------------

ENC_BATCH = 16


def prompts_of(meta: dict) -> list[dict]:
    """Sampled prompts: every held-out combination, then each distinct real-video caption (seen in
    training, so shown next to its own training clip)."""
    out = [{**h, "kind": "held-out"} for h in meta["held_out"]]
    seen = set()
    for i, m in enumerate(meta["train"]):
        if m["source"] != "procedural" and m["caption"] and m["caption"] not in seen:
            seen.add(m["caption"])
            out.append({"caption": m["caption"], "kind": "real", "fps": m["fps"], "train_index": i})
    return out


def stage_encode(config, stages: Stages, vae_record: dict, meta: dict, train: np.ndarray, held_out: np.ndarray) -> dict:
    from mugv.data import shards
    from mugv_data import text

    d = stages.start("encode", keep_partial=False)
    jv = load_vae(stages, vae_record)
    latents = encode_batched(jv, train, ENC_BATCH, "VAE-encoding training clips")
    txt = text.get_encoder(config.data.text_encoder, max_length=int(config.data.text_len))
    # Many clips share a caption: encode each distinct caption once.
    captions = [m["caption"] for m in meta["train"]]
    distinct = sorted(set(captions))
    f_all, m_all = [], []
    for i in tqdm(range(0, len(distinct), 64), desc="encoding captions", unit="batch"):
        f, m = txt.encode(distinct[i : i + 64])
        f_all += list(f)
        m_all += list(m)
    row = {c: i for i, c in enumerate(distinct)}
    feats = [f_all[row[c]] for c in captions]
    masks = [m_all[row[c]] for c in captions]

    def examples():
        for i, m in enumerate(meta["train"]):
            n = int(masks[i].sum())
            yield {
                "sample_id": m["id"],
                "source_id": m["source"],
                "caption": m["caption"],
                "latents": latents[i],
                "text": feats[i][:n],
                "text_len": n,
                "fps": float(m["fps"]),
                "num_frames": int(meta["frames"]),
                "height": int(meta["size"]),
                "width": int(meta["size"]),
                "bucket_id": 0,
            }

    ds = shards.write_shards(
        examples,
        d,
        buckets=[latents.shape[2:]],
        latent_channels=latents.shape[1],
        text_dim=feats[0].shape[-1],
        extra_index={"text_encoder": txt.name, "vae": vae_record["weights"]},
    )
    prompts = prompts_of(meta)
    py, pm = txt.encode([p["caption"] for p in prompts])
    # Image-to-video condition: the first frame as a still 17-frame clip, encoded; its first latent
    # frame depends on that one image only.
    firsts = [held_out[k][0] for k in range(len(meta["held_out"]))]
    firsts += [train[p["train_index"]][0] for p in prompts if p["kind"] == "real"]
    stills = np.stack([np.repeat(f[None], int(meta["frames"]), axis=0) for f in firsts])
    cond = encode_batched(jv, stills, ENC_BATCH, "VAE-encoding i2v images")[:, :, :1]
    truth = encode_batched(jv, held_out, ENC_BATCH, "VAE-encoding held-out ground truth")
    np.save(os.path.join(d, "train_latents.npy"), latents)
    np.savez(os.path.join(d, "prompts.npz"), y=py, mask=pm, cond=cond, truth=truth)
    with open(os.path.join(d, "prompts.json"), "w") as f:
        json.dump(prompts, f, indent=1)
    return {
        "dataset": os.path.relpath(ds, stages.workdir),
        "num_examples": len(latents),
        "latent_shape": list(latents.shape[1:]),
        "text_encoder": txt.name,
    }


# --- dit --------------------------------------------------------------------------------------


class _TrainProgress:
    """A tqdm bar (rate, ETA) for the trainer, fed from the metrics.jsonl it appends to, so the
    trainer itself stays unchanged."""

    def __init__(self, path: str, total: int):
        self.path, self.total = path, total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _last(self) -> tuple[int, float | None]:
        if not os.path.exists(self.path):
            return 0, None
        step, loss = 0, None
        with open(self.path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                step, loss = int(r["step"]), r.get("loss")
        return step, loss

    def _follow(self):
        start, _ = self._last()
        bar = tqdm(total=self.total, initial=start, desc="training MUG-DiT", unit="step")
        while True:
            stopping = self._stop.wait(1.0)
            step, loss = self._last()
            if step > bar.n:
                bar.update(step - bar.n)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
            if stopping:
                break
        bar.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def dit_train_config(config, stages: Stages, encode_record: dict) -> RunConfig:
    """`config.dit` as a run config, on the shards the encode stage wrote."""
    run = as_run_config(config.dit)
    return run.replace(data=dataclasses.replace(run.data, path=os.path.join(stages.workdir, encode_record["dataset"])))


def stage_dit(config, stages: Stages, encode_record: dict) -> dict:
    import jax
    from absl import flags

    from mugv.io import null_text
    from mugv.safetensors_io import save_atomic
    from mugv_jax import dit
    from mugv_jax.dit.checkpoint import model_from_params
    from mugv_jax.train import backend as train_lib

    d = stages.start("dit", keep_partial=True)
    run = dit_train_config(config, stages, encode_record)
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; callers outside app.run
        flags.FLAGS.mark_as_parsed()
    t0 = time.time()
    with _TrainProgress(os.path.join(d, "tensorboard", "metrics.jsonl"), run.num_steps):
        summary = train_lib.train(run, d)
    model_cfg = run.model_config
    ema = {k: np.asarray(v) for k, v in flatten(jax.device_get(summary["state"]["ema"])).items()}
    null = np.asarray(jax.device_get(summary["state"]["null_text"]))
    np.save(os.path.join(d, "null_text.npy"), null)
    path = os.path.join(d, "dit_ema.safetensors")
    save_atomic(
        dit.export_release_state_dict(model_from_params(model_cfg, ema)),
        path,
        metadata={"model": run.model, "step": str(summary["step"])},
    )
    # The sampler's default unconditional input (python -m mugv_jax.sample --checkpoint=PATH).
    null_text.save(null_text.sidecar_path(path), null, source=f"main job dit stage, step {summary['step']}")
    return {
        "steps": int(summary["step"]),
        "final_loss": summary["loss"],
        "seconds_this_run": time.time() - t0,
        "weights": os.path.relpath(path, stages.workdir),
        "model_config": model_cfg.to_dict(),
        "metrics": os.path.relpath(os.path.join(d, "tensorboard", "metrics.jsonl"), stages.workdir),
    }


# --- sample -----------------------------------------------------------------------------------


def stage_sample(
    config, stages: Stages, vae_record: dict, dit_record: dict, meta: dict, train: np.ndarray, held_out: np.ndarray
) -> dict:
    import jax

    from mugv.config import DiTConfig
    from mugv_jax import dit
    from mugv_jax.sample import sampler

    d = stages.start("sample", keep_partial=False)
    enc_dir = stages.dir("encode")
    with open(os.path.join(enc_dir, "prompts.json")) as f:
        prompts = json.load(f)
    pz = np.load(os.path.join(enc_dir, "prompts.npz"))
    train_latents = np.load(os.path.join(enc_dir, "train_latents.npy"))
    null = np.load(os.path.join(stages.dir("dit"), "null_text.npy"))
    model_cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dit_record["model_config"].items()})
    model = dit.load(os.path.join(stages.workdir, dit_record["weights"]), model_cfg)
    velocity = sampler.make_guided_velocity(model)
    seeds = int(config.sample.seeds)
    n_p = len(prompts)
    c, f, h, w = train_latents.shape[1:]
    length = pz["y"].shape[1]
    rows = [(p, s) for p in range(n_p) for s in range(seeds)]
    b = len(rows)
    y = pz["y"][[p for p, _ in rows]][:, None]
    mask = pz["mask"][[p for p, _ in rows]]
    neg_y = np.broadcast_to(null[None, None, :length], (b, 1, length, null.shape[-1]))
    neg_mask = np.ones((b, length), np.int32)
    fps = np.array([prompts[p]["fps"] for p, _ in rows], np.float32)
    fps = np.concatenate([fps, fps])  # the sampler runs [conditional; unconditional] in one batch
    out = {}
    for mode in ("t2v", "i2v"):
        z0 = np.zeros((b, c, f, h, w), np.float32)
        frame_mask = np.ones((b, f), np.float32)
        if mode == "i2v":
            z0[:, :, :1] = pz["cond"][[p for p, _ in rows]]
            frame_mask[:, 0] = 0.0
        key = jax.random.PRNGKey(1000 + int(config.seed) + (mode == "i2v"))
        with _quiet_progress(f"sampling {mode}"):
            z = sampler.sample(
                None,
                z0,
                y,
                mask,
                neg_y,
                neg_mask,
                height=h * 8,
                width=w * 8,
                num_steps=int(config.sample.steps),
                guidance_scale=float(config.sample.cfg_scale),
                frame_mask=frame_mask,
                key=key,
                fps=fps,
                shift=config.dit.objective.shift_ratio,
                velocity_fn=velocity,
                progress=True,
            )
        out[mode] = np.asarray(z)
    jv = load_vae(stages, vae_record)
    num_frames = int(meta["frames"])
    videos = {m: decode_batched(jv, out[m], num_frames, ENC_BATCH, f"decoding {m} samples") for m in out}
    recon_truth = decode_batched(jv, pz["truth"], num_frames, ENC_BATCH, "decoding held-out ground truth")
    np.savez(
        os.path.join(d, "samples.npz"),
        **{f"{m}_latents": out[m] for m in out},
        **{f"{m}_videos": videos[m] for m in videos},
    )

    means = measure.groups(train_latents, meta["train"])
    scale = int(config.sample.upscale)
    samples = []
    for i, (p, s) in enumerate(tqdm(rows, desc="writing videos and grids", unit="prompt")):
        pr = prompts[p]
        ref_index, ref_label = _reference_clip(pr, meta)
        for mode in ("t2v", "i2v"):
            name = f"{mode}_{p:02d}_{s}"
            rec = {"prompt": p, "caption": pr["caption"], "kind": pr["kind"], "seed": s, "mode": mode}
            if pr["kind"] == "held-out":
                group, dists = measure.nearest_group(out[mode][i], means)
                px = measure.pixel_measure(videos[mode][i])
                own = (pr["colour"], pr["direction"])
                rec.update(
                    target=list(own),
                    latent_nearest=list(group),
                    latent_ok=group == own,
                    latent_colour_ok=group[0] == own[0],
                    latent_direction_ok=group[1] == own[1],
                    rms_own=dists[own],
                    rms_others=float(np.mean([v for k, v in dists.items() if k != own])),
                    pixel=px,
                    pixel_colour_ok=px["colour"] == pr["colour"],
                    pixel_direction_ok=px["direction"] == pr["direction"],
                )
            # Every seed counts in the checks; the page shows the first few.
            if s < int(config.sample.media_seeds):
                write_mp4(os.path.join(d, f"{name}.mp4"), media.upscale(videos[mode][i], scale), pr["fps"])
                grid_rows = [(f"{mode} sample: {pr['caption']}", videos[mode][i])]
                if pr["kind"] == "held-out":  # the prompt's own rendering right under the sample
                    grid_rows.append(("ground truth of this prompt (never trained on)", held_out[p]))
                grid_rows.append((ref_label, train[ref_index]))
                media.frame_grid(os.path.join(d, f"{name}.png"), grid_rows)
                rec.update(video=f"sample/{name}.mp4", grid=f"sample/{name}.png")
            samples.append(rec)
    # Reference videos for the page: the training clip each prompt is compared with.
    for p, pr in enumerate(prompts):
        ref_index, _ = _reference_clip(pr, meta)
        write_mp4(os.path.join(d, f"reference_{p:02d}.mp4"), media.upscale(train[ref_index], scale), pr["fps"])
        if pr["kind"] == "held-out":
            write_mp4(os.path.join(d, f"truth_{p:02d}.mp4"), media.upscale(held_out[p], scale), pr["fps"])
            write_mp4(os.path.join(d, f"truth_vae_{p:02d}.mp4"), media.upscale(recon_truth[p], scale), pr["fps"])
    held_meta = meta["held_out"]
    vae_held = measure.reconstruction(
        held_out, recon_truth[: len(held_meta)], [h["colour"] for h in held_meta], [h["direction"] for h in held_meta]
    )
    return {
        "samples": samples,
        "checks": summarise(samples),
        "prompts": prompts,
        "vae_psnr_held_out": vae_held["psnr"],
        "vae_held_out": vae_held,
    }


def _reference_clip(prompt: dict, meta: dict) -> tuple[int, str]:
    """The training clip a sample is shown next to: its own clip for a seen (real) caption; for a
    held-out combination, a training clip of the same colour and direction (another shape)."""
    if prompt["kind"] == "real":
        return prompt["train_index"], f"training clip: {prompt['caption']}"
    for i, m in enumerate(meta["train"]):
        if m["source"] == "procedural" and (m["colour"], m["direction"]) == (prompt["colour"], prompt["direction"]):
            return i, f"training clip, same colour+direction: {m['caption']}"
    raise ValueError(
        f"no training clip has colour {prompt['colour']} and direction {prompt['direction']}; "
        f"raise config.data.procedural_count"
    )


def summarise(samples: list[dict]) -> dict:
    out = {}
    for mode in ("t2v", "i2v"):
        held = [s for s in samples if s["mode"] == mode and s["kind"] == "held-out"]
        if not held:
            continue
        out[mode] = {
            "samples": len(held),
            "latent_nearest_own_share": float(np.mean([s["latent_ok"] for s in held])),
            "latent_colour_share": float(np.mean([s["latent_colour_ok"] for s in held])),
            "latent_direction_share": float(np.mean([s["latent_direction_ok"] for s in held])),
            "pixel_colour_share": float(np.mean([s["pixel_colour_ok"] for s in held])),
            "pixel_direction_share": float(np.mean([s["pixel_direction_ok"] for s in held])),
        }
    return out


class _quiet_progress:
    """Names a sampling phase in the log (the sampler draws its own bar)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        log.info("%s", self.what)

    def __exit__(self, *exc):
        return False


# --- driver -----------------------------------------------------------------------------------


def run(config, workdir: str, redo=(), progress: bool = True) -> dict:
    """Run every stage not already done; returns the summary also written to summary.json."""
    from main_job import report

    t_start = time.time()
    as_run_config(config.dit)  # a wrong --config.dit.* is refused now, not after the VAE trained
    os.makedirs(workdir, exist_ok=True)
    stages = Stages(workdir, ORDER, redo)
    timings, reused = {}, []

    def stage(name, fn, *args):
        rec = stages.done(name)
        if rec is not None:
            reused.append(name)
            log.info("stage %s: done in an earlier run, reused (--redo=%s to repeat it)", name, name)
            return rec
        log.info("stage %s: running", name)
        t0 = time.time()
        rec = fn(config, stages, *args)
        timings[name] = time.time() - t0
        rec["seconds"] = timings[name]
        return stages.finish(name, rec)

    data_rec = stage("data", stage_data)
    meta, train, held_out = dataset.load(stages.dir("data"))
    vae_rec = stage("vae", stage_vae, train)
    enc_rec = stage("encode", stage_encode, vae_rec, meta, train, held_out)
    dit_rec = stage("dit", stage_dit, enc_rec)
    sample_rec = stage("sample", stage_sample, vae_rec, dit_rec, meta, train, held_out)
    summary = {
        "variant": config.variant,
        "workdir": os.path.abspath(workdir),
        "stages_run": list(timings),
        "stages_reused": reused,
        "seconds_by_stage": timings,
        "wall_seconds": time.time() - t_start,
        "data": data_rec,
        "vae": vae_rec,
        "encode": enc_rec,
        "dit": dit_rec,
        "checks": sample_rec["checks"],
        "vae_psnr_held_out": sample_rec["vae_psnr_held_out"],
        "vae_held_out": sample_rec.get("vae_held_out"),
    }
    summary["report"] = report.write(workdir, config, summary, sample_rec)
    summary["wall_seconds"] = time.time() - t_start
    write_json(os.path.join(workdir, "summary.json"), summary, default=str)
    print(
        f"report: {summary['report']}  ({summary['wall_seconds']:.0f}s; stages run: "
        f"{','.join(timings) or 'none'}; reused: {','.join(reused) or 'none'})",
        file=sys.stderr,
    )
    return summary
