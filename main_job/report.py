"""The main job's HTML report: <workdir>/report.html with loss-curve PNGs, every sample as an mp4
and a frame grid next to a training clip, the learning checks, throughput/MFU and the config.

All links are relative, so the work directory can be copied or served as is. A small inline
script checks that every image decoded and every video loaded its metadata, and writes the result
into #media-check (visible at the bottom; the browser test reads it).
"""

from __future__ import annotations

import glob
import html
import json
import os

from mugv.io.atomic import atomic_output, write_text

LOSS_PNG = "loss_dit.png"
VAE_LOSS_PNG = "loss_vae.png"

_CHECK_SCRIPT = """
<script>
(function () {
  function done() {
    var imgs = Array.prototype.map.call(document.images, function (i) {
      return {src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth};
    });
    var vids = Array.prototype.map.call(document.querySelectorAll('video'), function (v) {
      return {src: v.getAttribute('src'), ok: v.readyState >= 1 && v.duration > 0,
              readyState: v.readyState, duration: v.duration || 0, error: v.error ? v.error.code : null};
    });
    var el = document.getElementById('media-check');
    var bad = imgs.concat(vids).filter(function (m) { return !m.ok; }).length;
    el.setAttribute('data-result', JSON.stringify({images: imgs, videos: vids}));
    el.textContent = 'media check: ' + imgs.length + ' images, ' + vids.length + ' videos, ' + bad + ' broken';
  }
  function settled(v) {
    return v.readyState >= 1 || v.error;
  }
  window.addEventListener('load', function () {
    var vids = Array.prototype.slice.call(document.querySelectorAll('video'));
    var waited = 0;
    (function poll() {
      if (vids.every(settled) || waited > 8000) { done(); return; }
      waited += 100;
      setTimeout(poll, 100);
    })();
  });
})();
</script>
"""


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    # A resumed run appends; keep the latest record of each step.
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def plot_losses(rows: list[dict], path: str, title: str, keys=("loss",)) -> str | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for k in keys:
        # An empty noise-level quartile logs 0; a log axis cannot show it.
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=1.6 if k == "loss" else 0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _vae_metrics(workdir: str) -> list[dict]:
    found = sorted(glob.glob(os.path.join(workdir, "vae", "**", "metrics.jsonl"), recursive=True))
    return read_metrics(found[0]) if found else []


def _share(summary: dict, mode: str, key: str) -> str:
    c = summary["checks"].get(mode)
    return "n/a" if c is None else f"{c[key]:.0%} of {c['samples']}"


def _fmt(v, spec=".3g", none="n/a"):
    return none if v is None else format(v, spec)


def _table(rows: list[list], header: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _throughput(rows: list[dict]) -> str:
    if not rows:
        return "<p>no training metrics logged</p>"
    # The first logging window includes compilation; report the later ones.
    steady = rows[1:] or rows
    last = steady[-1]
    mean = lambda k: (
        sum(r[k] for r in steady if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in steady))
        if any(r.get(k) is not None for r in steady)
        else None
    )
    mfu = mean("mfu")
    lines = [
        ["step time (s)", _fmt(mean("step_time"), ".4f")],
        ["samples / s", _fmt(mean("samples_per_second"), ".1f")],
        ["video tokens / s", _fmt(mean("tokens_per_second"), ",.0f")],
        ["model TFLOP/s per device (mugv/flops.py)", _fmt(mean("tflops_per_device"), ".4f")],
        [
            "MFU",
            "n/a: no peak FLOP/s is known for this device kind (mugv/flops.py PEAK_FLOPS), e.g. a CPU"
            if mfu is None
            else f"{mfu:.2%}",
        ],
        ["logged windows (after the first)", str(len(steady))],
        ["last logged step", str(last["step"])],
    ]
    return _table(lines, ["throughput (DiT training, mean over logging windows)", "value"])


def _checks(checks: dict, min_share: dict) -> str:
    rows = []
    for mode, c in checks.items():
        rows.append(
            [
                mode,
                str(c["samples"]),
                f"{c['latent_nearest_own_share']:.0%}",
                f"{c['latent_colour_share']:.0%}",
                f"{c['latent_direction_share']:.0%}",
                f"{c['pixel_colour_share']:.0%}",
                f"{c['pixel_direction_share']:.0%}",
            ]
        )
    return (
        _table(
            rows,
            [
                "mode",
                "held-out samples",
                "latent: nearest group is own colour+direction",
                "latent: its colour right",
                "latent: its direction right",
                "pixels: colour right",
                "pixels: direction right",
            ],
        )
        + f"<p>Chance is 1/24 for the latent check (6 colours × 4 directions), 1/6 for colour, 1/4 "
        f"for direction. Thresholds the test suite asserts on the quick run: "
        f"{html.escape(json.dumps(min_share))}.</p>"
    )


def _video(src: str, caption: str) -> str:
    return (
        f'<figure><video src="{src}" controls muted loop autoplay preload="auto"></video>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _glance(sample_rec: dict) -> str:
    """One row per held-out prompt: its own ground truth, that truth through the VAE, then every
    shown sample, each captioned with what the pixel measure read off it."""
    prompts = sample_rec["prompts"]
    vae_held = sample_rec.get("vae_held_out") or {}
    per_clip = vae_held.get("psnr_per_clip") or []
    rows = []
    for p, pr in enumerate(prompts):
        if pr["kind"] != "held-out":
            continue
        # Held-out prompts come first, in the order of their ground truths.
        through = "ground truth through the VAE" + (f": {per_clip[p]:.1f} dB" if p < len(per_clip) else "")
        cells = [
            f"<td><b>{html.escape(pr['caption'])}</b></td>",
            f"<td>{_video(f'sample/truth_{p:02d}.mp4', 'ground truth')}</td>",
            f"<td>{_video(f'sample/truth_vae_{p:02d}.mp4', through)}</td>",
        ]
        for s in sample_rec["samples"]:
            if s["prompt"] != p or "video" not in s:
                continue
            px = s["pixel"]
            cap = (
                f"{s['mode']} seed {s['seed']}: {px['colour']} {_mark(s['pixel_colour_ok'])}, "
                f"{px['direction']} {_mark(s['pixel_direction_ok'])}"
            )
            cells.append(f"<td>{_video(s['video'], html.escape(cap))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = (
        "<tr><th>held-out prompt</th><th>ground truth</th><th>through the VAE</th>"
        "<th colspan=8>samples (t2v: text only; i2v: first frame given) — pixel measure: colour, direction</th></tr>"
    )
    note = ""
    if vae_held:
        note = (
            f"<p>VAE round trip of these {vae_held['clips']} ground truths: {vae_held['psnr']:.1f} dB PSNR; "
            f"object RMS error per RGB channel {', '.join(f'{v:.0f}' for v in vae_held['object_rmse_rgb'])} "
            f"(of 255); the pixel measure reads colour right for {vae_held['pixel_colour_share']:.0%} and "
            f"direction for {vae_held['pixel_direction_share']:.0%} of them.</p>"
        )
    return f"<h2>At a glance: held-out prompts</h2>{note}<table class=glance>{head}{''.join(rows)}</table>"


def _sample_section(sample_rec: dict) -> str:
    parts = []
    prompts = sample_rec["prompts"]
    by_prompt: dict[int, list[dict]] = {}
    for s in sample_rec["samples"]:
        by_prompt.setdefault(s["prompt"], []).append(s)
    for p, pr in enumerate(prompts):
        what = (
            "held-out combination (never in training)"
            if pr["kind"] == "held-out"
            else "real bundled video caption (seen in training)"
        )
        vids = [
            f'<figure><video src="sample/reference_{p:02d}.mp4" controls muted loop preload="auto"></video>'
            f"<figcaption>training clip</figcaption></figure>"
        ]
        if pr["kind"] == "held-out":
            vids.append(
                f'<figure><video src="sample/truth_{p:02d}.mp4" controls muted loop preload="auto"></video>'
                f"<figcaption>ground truth (not trained on)</figcaption></figure>"
            )
            vids.append(
                f'<figure><video src="sample/truth_vae_{p:02d}.mp4" controls muted loop preload="auto">'
                f"</video><figcaption>ground truth through the VAE</figcaption></figure>"
            )
        grids = []
        for s in by_prompt.get(p, []):
            if "video" not in s:
                continue
            note = ""
            if "latent_ok" in s:
                note = (
                    f" · latent nearest: {'/'.join(s['latent_nearest'])} {'✓' if s['latent_ok'] else '✗'}"
                    f" · pixels: {s['pixel']['colour']} {s['pixel']['direction']}"
                )
            vids.append(
                f'<figure><video src="{s["video"]}" controls muted loop preload="auto"></video>'
                f"<figcaption>{s['mode']} seed {s['seed']}{html.escape(note)}</figcaption></figure>"
            )
            grids.append(
                f'<figure><img src="{s["grid"]}" alt="{s["mode"]} frame grid"><figcaption>{s["mode"]} seed '
                f"{s['seed']}: sample (top), ground truth, training clip</figcaption></figure>"
            )
        parts.append(
            f"<h3>“{html.escape(pr['caption'])}” <small>{what}</small></h3>"
            f"<div class=row>{''.join(vids)}</div><div class=row>{''.join(grids)}</div>"
        )
    return "\n".join(parts)


def write(workdir: str, config, summary: dict, sample_rec: dict) -> str:
    """Write the loss PNGs and report.html into workdir; returns the report path."""
    dit_rows = read_metrics(os.path.join(workdir, summary["dit"]["metrics"]))
    plot_losses(
        dit_rows,
        os.path.join(workdir, LOSS_PNG),
        "MUG-DiT training loss",
        keys=("loss", "loss_by_t/q0", "loss_by_t/q1", "loss_by_t/q2", "loss_by_t/q3"),
    )
    vae_rows = _vae_metrics(workdir)
    present = {k for r in vae_rows for k in r}
    vae_keys = [
        k for k in ("train/loss", "train/mse", "train/l1", "train/perceptual", "train/kl", "loss") if k in present
    ]
    has_vae_png = (
        plot_losses(vae_rows, os.path.join(workdir, VAE_LOSS_PNG), "VAE training loss", keys=vae_keys or ("loss",))
        is not None
    )
    vae = summary["vae"]
    vae_line = (
        f"trained {vae['steps']} steps: reconstruction PSNR {_fmt(vae['psnr_before'], '.1f')} → "
        f"{_fmt(vae['psnr_after'], '.1f')} dB"
        if vae["trained"]
        else "<b>not trained</b> (config.vae.train=False, or mugv_jax.vae.training missing): this run used a "
        "randomly initialised tiny VAE (decoded videos are not meaningful; latent checks still are)"
    )
    stages = "".join(f"<li>{html.escape(k)}: {v:.0f} s</li>" for k, v in summary["seconds_by_stage"].items())
    reused = ", ".join(summary["stages_reused"]) or "none"
    data = summary["data"]
    dit = summary["dit"]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mugv main job report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1400px; }}
video {{ width: 128px; height: 128px; image-rendering: pixelated; background: #000; }}
figure {{ display: inline-block; margin: 0 10px 8px 0; vertical-align: top; }}
figcaption {{ font-size: 11px; max-width: 260px; }}
table.glance td {{ vertical-align: top; }} table.glance video {{ width: 96px; height: 96px; }}
.row {{ margin-bottom: 4px; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
pre {{ background: #f6f6f6; padding: 8px; font-size: 11px; max-height: 400px; overflow: auto; }}
</style></head><body>
<h1>mugv main job ({html.escape(summary["variant"])})</h1>
<p>Bundled data → small VAE → latent shards → small MUG-DiT (real trainer) → held-out text-to-video and
image-to-video samples. Work directory <code>{html.escape(summary["workdir"])}</code>.</p>
<ul>
<li>data: {data["num_train"]} training clips ({data["num_train"] - data["num_real"]} procedural,
{data["num_real"]} from bundled real videos {html.escape(", ".join(data["real_sources"]))}); {data["num_held_out"]}
held-out (colour, shape, direction) combinations</li>
<li>VAE: {vae_line}; held-out ground truth through the VAE: {summary["vae_psnr_held_out"]:.1f} dB PSNR</li>
<li>DiT: {dit["steps"]} steps of <code>{html.escape(config.dit.model)}</code> (with overrides), final loss
{_fmt(dit["final_loss"], ".4f")}; checkpoints and TensorBoard logs in <code>dit/</code></li>
<li>stages run now: <ul>{stages or "<li>none</li>"}</ul></li>
<li>stages reused from earlier runs: {html.escape(reused)}</li>
<li>wall time of this invocation: {summary["wall_seconds"]:.0f} s</li>
</ul>
<h2>Did it learn?</h2>
<p>Pixel measure of the decoded held-out samples: colour right for {_share(summary, "t2v", "pixel_colour_share")} (t2v)
and {_share(summary, "i2v", "pixel_colour_share")} (i2v), direction right for
{_share(summary, "t2v", "pixel_direction_share")} (t2v) and {_share(summary, "i2v", "pixel_direction_share")} (i2v).</p>
{_checks(summary["checks"], config.check.to_dict())}
<h2>Loss curves</h2>
<figure><img src="{LOSS_PNG}" alt="DiT loss">
<figcaption>MUG-DiT loss (and by noise-level quartile)</figcaption></figure>
{f'<figure><img src="{VAE_LOSS_PNG}" alt="VAE loss"><figcaption>VAE loss</figcaption></figure>' if has_vae_png else ""}
<h2>Throughput</h2>
{_throughput(dit_rows)}
{_glance(sample_rec)}
<h2>Samples</h2>
<p>Each prompt: the training clip it is compared with, then every sample (t2v: text only; i2v: the first frame
given). Frame grids show every second frame; videos are upscaled {int(config.sample.upscale)}× (nearest).</p>
{_sample_section(sample_rec)}
<h2>Config</h2>
<pre>{html.escape(config.to_json_best_effort(indent=2))}</pre>
<p id="media-check">media check: pending</p>
{_CHECK_SCRIPT}
</body></html>
"""
    return write_text(os.path.join(workdir, "report.html"), page)
