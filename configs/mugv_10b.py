"""MUG-V 10B training curriculum: `--config=configs/mugv_10b.py:<stage>[:<pod>[x<slices>]][@ROOT]`.

Stages follow the paper (docs/reference.md §7; docs/training_recipe.md has the commands). Each stage runs
in workdir ROOT/<stage> (ROOT defaults to runs/mugv_10b) and starts from the previous stage's
final EMA (`init_from=jax:ROOT/<previous>/checkpoints`, `init_weights=ema`) with a fresh
optimizer and its own buckets, batch sizes and schedule. The first stage starts from ROOT/expanded:
the tuned hidden-1728 model widened ×2 by `python -m mugv_jax.recipe.expand`.

  image_360      images + 360p 2 s video; image share annealed 0.6 → 0.1 (MixedLoader)
  video_360_2s   360p, 2 s clips, first-frame (image-to-video) masking on
  video_360_3s   360p, 3 s clips        } clip length raised 2 s → 5 s in sub-stages;
  video_360_5s   360p, 5 s clips        } run each until the validation loss plateaus
  video_720      720p, 5 s clips from the high-quality subset, first-frame masking kept
  sft            annealed SFT: curated subset, cosine decay to 0, checkpoints kept for post-hoc EMA
  preference     DPO + KTO with the SFT loss as regulariser (mugv_jax/train/preference.py)

LoRA fine-tunes of the 10B (the reference trainer's --lora: rank 64, alpha 32, every block linear;
the base frozen and stored in bfloat16, the adapters trained in float32), on the user's clips from
the release weights ROOT/dit.pt, in workdir ROOT/<stage>; laid out for a small slice (LORA_PODS):

  lora_360       360p, 5 s clips
  lora_720       720p, 5 s clips

<pod> picks the machine the stage is laid out for (default v5p-256; for the LoRA stages h100x8): the mesh, the attention
kernel and context-parallel mode, the remat policy and the micro-batch, with gradient
accumulation making up the stage's global batch. Pods: v5p-256, v6e-256 (TPU, splash kernel),
h100x64, h100x128 (H100 GPUs, cuDNN kernel). Every layout was chosen and checked with the
planner (`python -m mugv_jax.plan --config=configs/mugv_10b.py:<stage>:<pod>`; all of them:
`python bench/plan_targets.py`; figures in docs/scaling.md). `<pod>x<N>` (TPU pods) is N slices
of the pod joined over DCN (launch/tpu_multislice.sh): the same per-slice mesh, data parallelism
across slices, the same global batch. The H100 pods also carry the Megatron trainer's layout
(MEGATRON_LAYOUTS, config.megatron; `python -m mugv_megatron.plan`).

The paper publishes no batch size, step count or learning rate: a stage's global batch is
TOKENS_PER_STEP video tokens divided by the tokens of its largest sample, rounded down to a
multiple of BATCH_MULTIPLE (256, so that every data-parallel × accumulation split of a pod of up
to 256 devices divides it); all aspect buckets of a stage share it, and so do the image buckets of the mixed
stage (see _image_buckets). Learning rates are our choice (µP-style:
the small model's tuned rate is reused after expansion). Buckets are (latent frames, latent
height, latent width, global batch); pixel = latent × 8, pixel frames = 8·(latent frames − 1) + 1
(7 latent frames = 49 frames ≈ 2 s at 24 fps, 10 = 73 ≈ 3 s, 14 = 105 ≈ 5 s at 21 fps).
"""

from configs.base import base_config
from mugv.run.config import check_batch_split

DEFAULT_ROOT = "runs/mugv_10b"
EXPANDED = "expanded"
TOKENS_PER_STEP = 16_000_000
BATCH_MULTIPLE = 256
PATCH = 2
HEADS = 48
HIDDEN = 3456

# Aspect buckets per resolution, in latent units (H, W): portrait, landscape, square.
_360P = ((80, 46), (46, 80), (60, 60))
_720P = ((160, 90), (90, 160), (120, 120))


def _tokens(frames, h, w):
    return frames * (h // PATCH) * (w // PATCH)


def _buckets(spatial, frames):
    """One global batch for all aspect buckets of a clip length (the shard loader takes a single
    data.batch_size), sized by the largest sample."""
    most = max(_tokens(frames, h, w) for h, w in spatial)
    batch = max(BATCH_MULTIPLE, TOKENS_PER_STEP // most // BATCH_MULTIPLE * BATCH_MULTIPLE)
    return tuple((frames, h, w, batch) for h, w in spatial)


def _image_buckets(video):
    """Single-frame buckets with the video's batch: what the trainer runs today (with shards both
    children of the image:video mix read data.batch_size). The paper-like equal tokens per step
    (batch × frames = 16128 images) waits on the trainer: per-child batch sizes, and a micro-batch
    split that keeps each device's rows (planned: 76.8 GiB per device on v5p-256 with today's
    contiguous split, 16.8 GiB strided; docs/scaling.md)."""
    return tuple((1, h, w, batch) for frames, h, w, batch in video)


# stage → (previous stage, settings); the dict order is the training order. `clip` names the
# layout row (LAYOUTS) of the stage's largest sample.
STAGES = {
    "image_360": (
        EXPANDED,
        dict(
            clip="360p_2s",
            video=_buckets(_360P, 7),
            images=True,
            image_fraction=(0.6, 0.1),
            i2v_prob=0.0,
            steps=200_000,
            lr=1e-4,
        ),
    ),
    "video_360_2s": ("image_360", dict(clip="360p_2s", video=_buckets(_360P, 7), i2v_prob=0.2, steps=60_000, lr=1e-4)),
    "video_360_3s": (
        "video_360_2s",
        dict(clip="360p_3s", video=_buckets(_360P, 10), i2v_prob=0.2, steps=60_000, lr=1e-4),
    ),
    "video_360_5s": (
        "video_360_3s",
        dict(clip="360p_5s", video=_buckets(_360P, 14), i2v_prob=0.2, steps=80_000, lr=1e-4),
    ),
    "video_720": ("video_360_5s", dict(clip="720p_5s", video=_buckets(_720P, 14), i2v_prob=0.2, steps=30_000, lr=5e-5)),
    "sft": (
        "video_720",
        dict(clip="720p_5s", video=_buckets(_720P, 14), i2v_prob=0.2, steps=10_000, lr=2e-5, sft=True),
    ),
    "preference": (
        "sft",
        dict(clip="720p_5s", video=_buckets(_720P, 14), i2v_prob=0.0, steps=2_000, lr=1e-6, preference=True),
    ),
}

# LoRA fine-tunes: global batches sized for a few chips (the published curriculum's 16M tokens per
# step are a pod's), the reference trainer's adapters, a constant rate after a short warm-up.
LORA_RANK, LORA_ALPHA = 64, 32.0
LORA_STAGES = {
    "lora_360": dict(clip="360p_5s", video=tuple((14, h, w, 64) for h, w in _360P), steps=2_000, lr=1e-4),
    "lora_720": dict(clip="720p_5s", video=tuple((14, h, w, 16) for h, w in _720P), steps=2_000, lr=1e-4),
}
LORA_DEFAULT_POD = "h100x8"
RELEASE_WEIGHTS = "dit.pt"  # under ROOT: the official release's DiT weights


# The machines a stage is laid out for: the planner's device kind and device count (JAX devices).
# Pod names follow the vendor: a TPU v5p-N slice counts TensorCores, two per chip, and JAX shows
# one device per chip, so v5p-256 is 128 devices; v6e-N counts chips (one core each); h100xN is
# N GPUs.
def pod_devices(name: str) -> int:
    """JAX devices of a pod named as its vendor names it (v5p-256 → 128, v6e-256 → 256, h100x64 → 64)."""
    family, sep, count = name.rpartition("-") if name.startswith("v") else name.partition("x")
    if not sep or not count.isdigit():
        raise ValueError(f"pod name {name!r}: expected v5p-N, v6e-N or h100xN")
    cores_per_chip = {"v5p": 2, "v4": 2, "v6e": 1, "v5e": 1, "h100": 1, "h200": 1}.get(family)
    if cores_per_chip is None or int(count) % cores_per_chip:
        raise ValueError(f"pod name {name!r}: unknown family {family!r} or odd core count")
    return int(count) // cores_per_chip


PODS = {
    "v5p-256": dict(kind="tpu-v5p", devices=pod_devices("v5p-256")),
    "v6e-256": dict(kind="tpu-v6e", devices=pod_devices("v6e-256")),
    "h100x64": dict(kind="h100", devices=pod_devices("h100x64")),
    "h100x128": dict(kind="h100", devices=pod_devices("h100x128")),
}
DEFAULT_POD = "v5p-256"
# The small slices the LoRA stages are laid out for (LORA_LAYOUTS); the curriculum needs a pod.
LORA_PODS = {
    "h100x8": dict(kind="h100", devices=pod_devices("h100x8")),
    "v5p-16": dict(kind="tpu-v5p", devices=pod_devices("v5p-16")),
    "v6e-16": dict(kind="tpu-v6e", devices=pod_devices("v6e-16")),
}

# (clip, pod) → mesh (data, fsdp, tensor, context), attention ("backend+context-parallel mode"),
# remat policy, and `micro`: samples per data-parallel rank in one micro-batch;
# optim.grad_accum_steps is then batch / (data · fsdp · micro). The attention is the pod's fused
# kernel (splash on TPU, cuDNN on H100) with Ulysses where the heads per tensor shard divide by the
# context degree, else the fused ring. Chosen by `python bench/plan_search.py --stage=S --pod=P`
# (the first candidate in its order of expected speed that the planner finds within 90% of HBM)
# or carried over from the XLA-attention layouts (the fused kernels only need less memory), and
# checked by `python bench/plan_targets.py`; docs/scaling.md says which and has the figures.
LAYOUTS = {
    ("360p_2s", "v5p-256"): ((1, 128, 1, 1), "splash", "full", 6),
    ("360p_3s", "v5p-256"): ((1, 128, 1, 1), "splash", "full", 4),
    ("360p_5s", "v5p-256"): ((1, 64, 1, 2), "splash+ulysses", "full", 1),
    ("720p_5s", "v5p-256"): ((1, 16, 1, 8), "splash+ulysses", "full", 2),
    ("360p_2s", "v6e-256"): ((1, 128, 1, 2), "splash+ulysses", "full", 2),
    ("360p_3s", "v6e-256"): ((1, 32, 1, 8), "splash+ulysses", "full", 3),
    ("360p_5s", "v6e-256"): ((1, 64, 1, 4), "splash+ulysses", "full", 1),
    ("720p_5s", "v6e-256"): ((1, 8, 2, 16), "splash+ring", "full", 1),
    ("360p_2s", "h100x64"): ((1, 64, 1, 1), "cudnn", "full", 2),
    ("360p_3s", "h100x64"): ((1, 32, 1, 2), "cudnn+ulysses", "full", 3),
    ("360p_5s", "h100x64"): ((1, 32, 1, 2), "cudnn+ulysses", "full", 2),
    ("720p_5s", "h100x64"): ((1, 4, 2, 8), "cudnn+ulysses", "full", 2),
    ("360p_2s", "h100x128"): ((1, 128, 1, 1), "cudnn", "full", 2),
    ("360p_3s", "h100x128"): ((1, 64, 1, 2), "cudnn+ulysses", "full", 3),
    ("360p_5s", "h100x128"): ((1, 64, 1, 2), "cudnn+ulysses", "full", 2),
    ("720p_5s", "h100x128"): ((1, 16, 1, 8), "cudnn+ulysses", "full", 1),
}

# (clip, pod) → the Megatron trainer's layout on the H100 pods: (tp, sp, pp, cp, micro_batch_size,
# recompute); the accumulation is then batch / (data parallel · micro), data parallel = GPUs /
# (tp·pp·cp). Chosen by `python bench/plan_targets.py --backend=megatron --search` (the fastest
# candidate of mugv_megatron.plan.search whose analytic memory estimate fits the H100 with 10%
# headroom) and checked by tests/mugv_megatron/test_megatron_plan.py; docs/scaling.md has the figures.
# The JAX layout above and this one are separate: each backend reads only its own (config.mesh,
# attention, remat, optim.grad_accum_steps for JAX; config.megatron for Megatron).
MEGATRON_LAYOUTS = {
    ("360p_2s", "h100x64"): (4, True, 1, 1, 1, "none"),
    ("360p_3s", "h100x64"): (4, True, 1, 1, 1, "none"),
    ("360p_5s", "h100x64"): (8, True, 1, 1, 1, "none"),
    ("720p_5s", "h100x64"): (2, True, 1, 1, 1, "full"),
    ("360p_2s", "h100x128"): (4, True, 1, 1, 1, "none"),
    ("360p_3s", "h100x128"): (4, True, 1, 1, 1, "none"),
    ("360p_5s", "h100x128"): (8, True, 1, 1, 1, "none"),
    ("720p_5s", "h100x128"): (2, True, 1, 1, 1, "full"),
}

# (clip, pod) → the LoRA stages' layouts, as LAYOUTS. The frozen base has no gradients, optimizer
# state or EMA and is stored in bfloat16 (20 GiB for the whole 10B), so where it fits whole a
# device keeps it (data parallelism: no all-gathers of the base) and fsdp only where HBM is short
# (v6e's 32 GiB); context parallelism where one sample's activations are too large. Chosen and
# checked with `python bench/plan_targets.py --lora` (docs/scaling.md "LoRA fine-tunes").
LORA_LAYOUTS = {
    ("360p_5s", "h100x8"): ((8, 1, 1, 1), "cudnn", "full", 1),
    ("720p_5s", "h100x8"): ((4, 1, 1, 2), "cudnn+ulysses", "full", 1),
    ("360p_5s", "v5p-16"): ((8, 1, 1, 1), "splash", "full", 2),
    ("720p_5s", "v5p-16"): ((4, 1, 1, 2), "splash+ulysses", "full", 1),
    ("360p_5s", "v6e-16"): ((1, 16, 1, 1), "splash", "full", 1),
    ("720p_5s", "v6e-16"): ((1, 2, 1, 8), "splash+ulysses", "full", 1),
}


def parse_pod(name: str) -> tuple[str, int]:
    """`<pod>` or `<pod>x<N>`, N TPU slices of that pod joined over DCN → (pod, N)."""
    pods = {**PODS, **LORA_PODS}
    if name in pods:
        return name, 1
    base, sep, count = name.rpartition("x")
    if sep and base in pods and count.isdigit() and int(count) >= 1:
        if not pods[base]["kind"].startswith("tpu"):
            raise ValueError(f"configs/mugv_10b.py: pod {name!r}: slices are TPU slices; GPUs are one pod (h100xN)")
        return base, int(count)
    choices = list(pods) + [f"{p}x2" for p in pods if pods[p]["kind"].startswith("tpu")]
    raise ValueError(f"configs/mugv_10b.py: unknown pod {name!r}; choose from {choices} (x<N>: N slices)")


def parse_arg(arg):
    """`<stage>[:<pod>[x<slices>]][@ROOT]` → (stage, pod, root). ROOT may itself contain ':' (gs://...)."""
    head, _, root = (arg or "").partition("@")
    stage, _, pod = head.partition(":")
    if stage not in STAGES and stage not in LORA_STAGES:
        raise ValueError(
            f"configs/mugv_10b.py: unknown stage {stage!r}; choose from {list(STAGES) + list(LORA_STAGES)}"
        )
    pod = pod or (LORA_DEFAULT_POD if stage in LORA_STAGES else DEFAULT_POD)
    try:
        parse_pod(pod)
    except ValueError as e:
        raise ValueError(f"{e} (in {arg!r})") from None
    return stage, pod, root or DEFAULT_ROOT


def apply_layout(c, clip, pod_name, accumulate=True, lora=False):
    """Set mesh, attention, remat and grad_accum_steps of config `c` for `clip` on `pod_name`.

    On N slices (`<pod>x<N>`) every slice has the pod's mesh, data parallelism spans the slices
    (mesh.dcn.data = N) and the global batch stays the stage's: the accumulation shrinks, and
    where the per-rank samples do not split into the planned micro-batch, the largest smaller
    micro-batch that does is used (less memory than planned). `lora`: the LoRA stages' table."""
    pod_name, slices = parse_pod(pod_name)
    pod = {**PODS, **LORA_PODS}[pod_name]
    table, table_name = (LORA_LAYOUTS, "LORA_LAYOUTS") if lora else (LAYOUTS, "LAYOUTS")
    if (clip, pod_name) not in table:
        laid_out = sorted(p for c, p in table if c == clip)
        kind = "LoRA stages" if lora else "the curriculum (a LoRA stage fits a small slice)"
        raise ValueError(
            f"configs/mugv_10b.py: no {table_name} entry for {clip} on pod {pod_name!r}; {kind}: choose from {laid_out}"
        )
    (data, fsdp, tensor, context), attention, remat, micro = table[(clip, pod_name)]
    mode = attention.partition("+")[2]
    where = f"configs/mugv_10b.py {table_name}[{(clip, pod_name)}]" + (f" on {slices} slices" if slices > 1 else "")
    if data * fsdp * tensor * context != pod["devices"]:
        raise ValueError(f"{where}: mesh {(data, fsdp, tensor, context)} does not cover {pod['devices']} devices")
    if HIDDEN % fsdp:
        raise ValueError(f"{where}: fsdp={fsdp} does not divide the hidden size {HIDDEN}")
    if mode == "ulysses" and HEADS % (tensor * context):
        raise ValueError(f"{where}: Ulysses needs heads/tensor ({HEADS}/{tensor}) divisible by context={context}")
    dp = data * fsdp * slices
    batches = [b[3] for b in c.data.buckets] + [b[3] for b in c.data.mix.image_buckets]
    if slices > 1 and accumulate:
        for batch in batches:
            if batch % dp:
                fit = [n for n in range(1, slices) if batch % (data * fsdp * n) == 0]
                raise ValueError(
                    f"{where}: global batch {batch} does not split over {dp} data-parallel ranks "
                    f"({slices} slices × data·fsdp {data * fsdp}); it splits over {', '.join(map(str, fit))} slice(s)"
                )
        per_rank = c.data.buckets[0][3] // dp
        micro = max(m for m in range(1, micro + 1) if per_rank % m == 0)
    accum = c.data.buckets[0][3] // (dp * micro) if accumulate else 1
    for batch in batches:  # the trainers' and the planner's own check
        check_batch_split(batch, accum, dict(data=data * slices, fsdp=fsdp), where)
    c.mesh.ici = dict(data=data, fsdp=fsdp, tensor=tensor, context=context)
    c.mesh.dcn = dict(data=slices, fsdp=1, tensor=1, context=1)
    c.attention = attention
    c.remat = remat
    c.optim.grad_accum_steps = accum
    name = pod_name + (f"x{slices}" if slices > 1 else "")
    c.target.name, c.target.kind, c.target.devices, c.target.slices = name, pod["kind"], pod["devices"] * slices, slices


def apply_megatron_layout(c, clip, pod_name, accumulate=True):
    """Set config.megatron of `c` for `clip` on an H100 pod (other pods keep the defaults)."""
    if (clip, pod_name) not in MEGATRON_LAYOUTS:  # TPU pods (and their slices): the defaults
        return
    tp, sp, pp, cp, micro, recompute = MEGATRON_LAYOUTS[(clip, pod_name)]
    where = f"configs/mugv_10b.py MEGATRON_LAYOUTS[{(clip, pod_name)}]"
    gpus = PODS[pod_name]["devices"]
    if gpus % (tp * pp * cp) or HEADS % tp:
        raise ValueError(f"{where}: tp·pp·cp = {tp * pp * cp} must divide {gpus} GPUs and tp the {HEADS} heads")
    dp = gpus // (tp * pp * cp)
    batches = [b[3] for b in c.data.buckets] + [b[3] for b in c.data.mix.image_buckets]
    for batch in batches if accumulate else ():
        if batch % (dp * micro):
            raise ValueError(
                f"{where}: global batch {batch} is not a multiple of data parallel {dp} × micro-batch {micro}"
            )
    c.megatron.update(dict(tp=tp, sp=sp, pp=pp, cp=cp, recompute=recompute))
    # Preference steps do not accumulate (mugv_megatron/train/preference.py): one batch per step.
    c.megatron.micro_batch_size = micro if accumulate else None


def lora_config(stage, pod, root):
    """A LoRA fine-tune (LORA_STAGES) of the release weights ROOT/dit.pt on the user's clips."""
    s = LORA_STAGES[stage]
    c = base_config()
    c.model = "10b"
    c.stage = stage
    c.compute_dtype = "bfloat16"
    c.init_from = f"release:{root}/{RELEASE_WEIGHTS}"
    c.num_steps = s["steps"]
    c.optim.learning_rate = s["lr"]
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.999
    c.lora.rank, c.lora.alpha, c.lora.base_dtype = LORA_RANK, LORA_ALPHA, "bfloat16"
    c.data.source = "shards"
    c.data.buckets = s["video"]
    c.data.batch_size = s["video"][0][3]
    c.data.text_len = 300
    c.objective.i2v_prob = 0.2
    c.objective.i2v_mode = "first"
    c.objective.caption_dropout_prob = 0.1
    c.checkpoint_every = 500
    apply_layout(c, s["clip"], pod, lora=True)
    c.validation.every = 500
    c.validation.num_batches = 4
    c.log_every = 10
    return c


def get_config(arg: str = "video_720"):
    stage, pod, root = parse_arg(arg)
    if stage in LORA_STAGES:
        return lora_config(stage, pod, root)
    prev, s = STAGES[stage]
    c = base_config()
    c.model = "10b"
    c.stage = stage
    c.compute_dtype = "bfloat16"
    c.init_from = f"jax:{root}/{EXPANDED}" if prev == EXPANDED else f"jax:{root}/{prev}/checkpoints"
    c.init_weights = "ema"
    c.num_steps = s["steps"]
    c.optim.learning_rate = s["lr"]
    c.optim.warmup_steps = 1000
    c.optim.ema_decay = 0.9999
    c.data.source = "shards"
    c.data.buckets = s["video"]
    c.data.batch_size = s["video"][0][3]  # the shard loader's global batch (one for every bucket)
    c.data.text_len = 300
    c.objective.i2v_prob = s["i2v_prob"]
    c.objective.i2v_mode = "first"
    c.objective.caption_dropout_prob = 0.1
    if s.get("images"):
        c.data.mix.image_buckets = _image_buckets(s["video"])
        c.data.mix.image_fraction_start, c.data.mix.image_fraction_end = s["image_fraction"]
        c.data.mix.anneal_steps = s["steps"] // 2
    if s.get("sft"):
        # Annealed SFT on the curated subset (set data.path); checkpoints every 500 steps are all
        # kept so `python -m mugv_jax.recipe.posthoc_ema` can average them afterwards.
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 0
        c.optim.decay_steps = s["steps"]
        c.optim.final_lr_ratio = 0.0
        c.checkpoint_every = 500
        c.keep_checkpoints = s["steps"] // 500
    else:
        c.checkpoint_every = 1000
    if s.get("preference"):
        c.mode = "preference"
        c.init_from = f"jax:{root}/sft_posthoc_ema"  # written by mugv_jax.recipe.posthoc_ema
        c.optim.warmup_steps = 0
        p = c.preference  # fields not set here keep mugv.training.PreferenceConfig's defaults
        p.batch_size, p.heldout_batches, p.eval_every = 64, 4, 200
        p.beta_dpo, p.beta_kto, p.sft_weight = 2000.0, 2000.0, 0.2
    # Preference steps do not accumulate gradients (mugv_jax/train/preference.py).
    apply_layout(c, s["clip"], pod, accumulate=not s.get("preference"))
    apply_megatron_layout(c, s["clip"], pod, accumulate=not s.get("preference"))
    c.validation.every = 2000
    c.validation.num_batches = 8
    c.log_every = 10
    return c
