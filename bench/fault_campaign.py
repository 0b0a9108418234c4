"""Fault campaign: inflict what a cluster inflicts, count what survives (issue 26).

    python bench/fault_campaign.py --trials 5 --seed 0            # the table in docs/benchmarks.md
    python bench/fault_campaign.py --trials 1 --classes shards     # one class

Each trial runs a trainer (`configs/tiny.py`, `--steps` steps, a checkpoint every 2) in its own
process group, hits it at a seeded random moment, resumes it to the end and compares the final
state bit for bit with an uninterrupted run of the same backend (one reference per backend):

    kill        SIGKILL at a random moment (often inside an asynchronous save), then resume
    group-term  SIGTERM to the whole process group (Slurm, timeout, Kubernetes), which must save
                and exit 0, then resume
    flip        one byte changed in a random file of the newest checkpoint, then resume
    lineage     kill or group-term (drawn), then one byte changed in the newest checkpoint it
                left, then resume: three faults for one run (what the test suite runs)
    shards      a shard file of a small dataset deleted, truncated or garbled, then an epoch read
    convert     a conversion SIGKILLed mid-write, then run again

Outcomes: identical (bit-identical to the reference / the undamaged data), refused loudly (a
named error or a prominent warning, nothing used), silently wrong (must be 0), data lost (a
checkpoint or step gone, a SIGTERM that did not save, a partial output left behind; must be 0).
The test suite runs a seeded subset (tests/cross_backend/test_fault_campaign.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUCKETS = {"jax": "((2,4,6,8),)", "megatron": "((2,4,4,4),)"}
DIGESTS = "mugv_digests.json"  # both formats' digest table (mugv.io.orbax, mugv.io.torch_dist)
OUTCOMES = ("identical", "refused loudly", "silently wrong", "data lost")
LOUD = ("CHECKPOINT UNREADABLE", "DATA EXCLUDED", "Error", "error:")


# ---------------------------------------------------------------------------------------------
# trainer runs


def trainer_cmd(backend: str, workdir: str, steps: int) -> list[str]:
    module = "mugv_jax.train" if backend == "jax" else "mugv_megatron.train"
    return [
        sys.executable,
        "-m",
        module,
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.num_steps={steps}",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
        f"--config.data.buckets={BUCKETS[backend]}",
    ]


def start(backend: str, workdir: str, steps: int, log: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = open(log, "ab")
    return subprocess.Popen(
        trainer_cmd(backend, workdir, steps), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left (none expected)
        except ProcessLookupError:
            pass


def run_to_end(backend: str, workdir: str, steps: int, log: str) -> int:
    return finish(start(backend, workdir, steps, log))


def logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "tensorboard", "metrics.jsonl")
    if not os.path.exists(path):
        return -1
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return max((r["step"] for r in rows if "loss" in r), default=-1)


def checkpoint_dirs(backend: str, workdir: str) -> list[str]:
    ck = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    if backend == "jax":
        names = sorted((n for n in os.listdir(ck) if n.isdigit()), key=int)
    else:
        names = sorted(n for n in os.listdir(ck) if n.startswith("iter_") and n[5:].isdigit())
    return [os.path.join(ck, n) for n in names]


def leftovers(workdir: str) -> list[str]:
    """Partial outputs a finished run must not leave (moved-aside checkpoints are kept on purpose)."""
    ck = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    return [n for n in os.listdir(ck) if n.endswith(".tmp") or ".partial-" in n or "tmp" in n.split(".")[-1]]


def final_state(backend: str, workdir: str) -> dict:
    """{entry: bytes} of the newest checkpoint's whole training state, and its data position."""
    import numpy as np

    newest = checkpoint_dirs(backend, workdir)[-1]
    out = {}
    if backend == "jax":
        from mugv.io import orbax

        state_dir = os.path.join(newest, orbax.STATE)
        names = [".".join(k) for k in orbax.state_leaves(state_dir)]
        for name, array in orbax.open_state_arrays(state_dir, names).items():
            out[name] = np.asarray(array.read().result()).tobytes()
        with open(os.path.join(newest, orbax.DATA, "metadata")) as f:
            out["data"] = f.read().encode()
    else:
        import torch

        from mugv.io.torch_dist import TorchDistReader, read_metadata

        reader = TorchDistReader(newest)
        for key, meta in read_metadata(newest).state_dict_metadata.items():
            if hasattr(meta, "chunks") and hasattr(meta, "size"):
                out[key] = np.ascontiguousarray(reader.read_stored(key)).tobytes()
        common = torch.load(os.path.join(newest, "common.pt"), weights_only=False)["mugv"]
        out["data"] = json.dumps({"data": common["data"], "trainer": common["trainer"]}, sort_keys=True).encode()
    out["step"] = os.path.basename(newest).encode()
    return out


def flip_byte(path: str, rng: random.Random) -> int:
    size = os.path.getsize(path)
    offset = rng.randrange(size)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
    return offset


def _files(root: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns)


def trainer_trial(
    backend: str, fault: str, ref: dict, steps: int, rng: random.Random, tmp: str, signal_kind: str | None = None
) -> tuple[str, str]:
    """(outcome, what happened) of one trial of `fault` on `backend` (`signal_kind`: the lineage's
    signal, else drawn)."""
    workdir, log = os.path.join(tmp, "run"), os.path.join(tmp, "run.log")
    note = ""
    flip_after = fault == "lineage"
    if flip_after:
        fault = signal_kind or rng.choice(["kill", "group-term"])
    if fault in ("kill", "group-term"):
        proc = start(backend, workdir, steps, log)
        # A group SIGTERM once the first save has begun (megatron's writer helper exists then).
        at, delay = rng.randrange(1 if fault == "kill" else 2, steps), rng.uniform(0.0, 1.5)
        deadline = time.time() + 600
        while logged_step(workdir) < at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        note = f"signal after step {logged_step(workdir)} + {delay:.2f}s"
        if fault == "kill":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finish(proc)
        else:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            code = finish(proc)
            if code != 0:
                return "data lost", f"{note}: SIGTERM to the group exited {code}, not 0 (no save)"
        note = f"{fault}: {note}"
        # Bytes rot in a checkpoint whose checksums were recorded (the newest may have died
        # between its save and its table: docs/run_loop.md).
        recorded = [d for d in checkpoint_dirs(backend, workdir) if os.path.isfile(os.path.join(d, DIGESTS))]
        if flip_after and recorded:
            target = rng.choice(_files(recorded[-1]))
            note += f"; then byte {flip_byte(target, rng)} of {os.path.relpath(target, workdir)} changed"
            # Reported when the resume reads it (it is the newest); else rotation may retire it.
            fault = "flip" if recorded[-1] == checkpoint_dirs(backend, workdir)[-1] else "flip-older"
    elif fault == "flip":  # a finished run, one byte changed in its newest checkpoint
        if run_to_end(backend, workdir, steps, log) != 0:
            return "data lost", "the run to flip did not finish"
        target = rng.choice(_files(checkpoint_dirs(backend, workdir)[-1]))
        note = f"byte {flip_byte(target, rng)} of {os.path.relpath(target, workdir)}"
    before = set(checkpoint_dirs(backend, workdir))
    mark = os.path.getsize(log) if os.path.exists(log) else 0
    code = run_to_end(backend, workdir, steps, log)
    text = open(log, errors="replace").read()[mark:]
    if code != 0:
        loud = any(s in text for s in LOUD)
        return ("refused loudly" if loud else "silently wrong"), f"{note}: resume exited {code}"
    ck = os.path.join(workdir, "checkpoints")
    aside = [n for n in os.listdir(ck) if ".unreadable-" in n]
    gone = [d for d in before if not os.path.exists(d) and not any(os.path.basename(d) in a for a in aside)]
    if leftovers(workdir):
        return "data lost", f"{note}: left {leftovers(workdir)}"
    got = final_state(backend, workdir)
    if got != ref:
        differ = sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))[:5]
        return "silently wrong", f"{note}: final state differs in {differ}"
    if fault == "flip" and "CHECKPOINT UNREADABLE" not in text:
        # Bit-identical anyway: the byte was one the state does not depend on, yet unreported.
        return "silently wrong", f"{note}: not reported"
    del gone  # rotation removes old steps of this run: not a loss
    return "identical", note + (f"; moved aside {aside}" if aside else "")


# ---------------------------------------------------------------------------------------------
# shards and conversions


def small_dataset(out: str) -> str:
    from absl import flags

    from mugv.data import procedural, shards
    from mugv_data import encode
    from mugv_data.encode import ClipInput, PixelBucket
    from mugv_data.text import HashingTextEncoder

    flags.FLAGS.mark_as_parsed()
    buckets = [PixelBucket(17, 32, 32)]
    clips = (
        ClipInput(c.sample_id, "procedural", c.caption, c.frames, c.fps)
        for c in procedural.generate(24, seed=5, num_frames=17, size=32)
    )
    lat, txt = encode.PatchMeanEncoder(), HashingTextEncoder(dim=16, max_length=8)
    examples = list(encode.encode_clips(clips, buckets, lat, txt, batch_size=8))
    return shards.write_shards(
        lambda: examples, out, buckets=encode.latent_buckets(buckets, lat), latent_channels=24, text_dim=16,
        num_shards=3,
    )  # fmt: skip


def _epoch(ds: str):
    from mugv.data.loader import ShardLoader

    loader = ShardLoader(ds, 4, text_len=8, seed=1)
    batches = [next(loader) for _ in range(loader.plan.batches_per_epoch)]
    return loader, b"".join(b["latents"].tobytes() + b["y"].tobytes() for b in batches)


def shard_trial(clean: str, rng: random.Random, tmp: str) -> tuple[str, str]:
    import logging

    from mugv.data import shards

    ds = os.path.join(tmp, "ds")
    shutil.copytree(clean, ds)
    victim = rng.choice(shards.shard_files(ds))
    how = rng.choice(["delete", "truncate", "garble"])
    if how == "delete":
        os.remove(victim)
    elif how == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(rng.randrange(os.path.getsize(victim)))
    else:
        for _ in range(rng.randrange(1, 17)):
            flip_byte(victim, rng)
    note = f"{how} {os.path.basename(victim)}"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mugv.data").addHandler(handler)
    try:
        _, want = _epoch(clean)
        try:
            loader, got = _epoch(ds)
        except (shards.BadShard, RuntimeError) as e:
            named = os.path.basename(victim) in str(e)
            return ("refused loudly" if named else "silently wrong"), f"{note}: {type(e).__name__}"
    finally:
        logging.getLogger("mugv.data").removeHandler(handler)
    if got == want:
        return "identical", note + " (no record changed)"
    if loader.skipped and any(os.path.basename(victim) in r.getMessage() for r in records):
        return "refused loudly", f"{note}: {loader.skipped} records skipped, each logged with its file"
    return "silently wrong", f"{note}: different batches, nothing said"


def convert_trial(rng: random.Random, tmp: str) -> tuple[str, str]:
    from converters.convert import verify
    from tests.helpers import DIT_WEIGHTS

    fmt = rng.choice(["jax", "megatron", "release"])
    dst = os.path.join(tmp, "out.pt" if fmt == "release" else "out")
    spec = f"{fmt}:{dst}"
    slow = (
        "import time, sys\n"
        "from mugv.io.release import ReleaseReader\n"
        "jobs = ReleaseReader.jobs\n"
        "def slow(self):\n"
        "    for item in jobs(self):\n"
        "        time.sleep(0.05)\n"
        "        yield item\n"
        "ReleaseReader.jobs = slow\n"
        "from converters.cli import main\n"
        f"sys.exit(main(['convert', '--src', {DIT_WEIGHTS!r}, '--dst', {spec!r}, '--quiet']))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 300
    while not any(".partial-" in n for n in os.listdir(tmp)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    delay = rng.uniform(0.0, 2.0)
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    note = f"{fmt}, killed {delay:.2f}s into the write"
    if os.path.exists(dst):
        if not verify(DIT_WEIGHTS, spec).equal:
            return "silently wrong", f"{note}: a complete-looking output differs"
        return "identical", note + " (finished before the kill)"
    rerun = subprocess.run(
        [sys.executable, "-m", "converters", "convert", "--src", DIT_WEIGHTS, "--dst", spec, "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    left = [n for n in os.listdir(tmp) if ".partial-" in n]
    if rerun.returncode != 0 or left:
        return "data lost", f"{note}: re-run exited {rerun.returncode}, left {left}"
    if not verify(DIT_WEIGHTS, spec).equal:
        return "silently wrong", f"{note}: the re-run's output differs"
    return "identical", note + ("; the partial removed: " + rerun.stderr.strip()[:80] if rerun.stderr else "")


# ---------------------------------------------------------------------------------------------


TRAINER_FAULTS = ("kill", "group-term", "flip", "lineage")
CLASSES = ("kill", "group-term", "flip", "shards", "convert")


def campaign(
    trials: int,
    seed: int,
    classes=CLASSES,
    backends=("jax", "megatron"),
    steps: int = 6,
    log=print,
    signals: dict | None = None,
):
    """{(class, backend): Counter(outcome)} and every trial's line; `signals` {backend: "kill" |
    "group-term"} fixes the lineage's signal per backend."""
    rng = random.Random(seed)
    counts: dict = collections.defaultdict(collections.Counter)
    lines = []
    with tempfile.TemporaryDirectory(prefix="mugv-faults-") as root:
        # Every JAX run compiles the same step: once, through the persistent cache.
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax-cache"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
        refs = {}
        for backend in backends if set(classes) & set(TRAINER_FAULTS) else ():
            wd = os.path.join(root, f"ref-{backend}")
            code = run_to_end(backend, wd, steps, wd + ".log")
            if code != 0:
                raise RuntimeError(f"the {backend} reference run failed ({code}): see {wd}.log")
            refs[backend] = final_state(backend, wd)
        clean = small_dataset(os.path.join(root, "clean")) if "shards" in classes else None
        for i in range(trials):
            for fault in classes:
                for backend in backends if fault in TRAINER_FAULTS else ("-",):
                    tmp = tempfile.mkdtemp(dir=root)
                    t0 = time.time()
                    if fault == "shards":
                        outcome, what = shard_trial(clean, rng, tmp)
                    elif fault == "convert":
                        outcome, what = convert_trial(rng, tmp)
                    else:
                        kind = (signals or {}).get(backend)
                        outcome, what = trainer_trial(backend, fault, refs[backend], steps, rng, tmp, kind)
                    counts[(fault, backend)][outcome] += 1
                    line = f"{fault:10s} {backend:8s} #{i}: {outcome:15s} {what} ({time.time() - t0:.0f}s)"
                    lines.append(line)
                    log(line)
                    shutil.rmtree(tmp, ignore_errors=True)
    return counts, lines


def table(counts) -> str:
    rows = ["| fault | backend | trials | " + " | ".join(OUTCOMES) + " |", "|---|---|---|" + "---|" * len(OUTCOMES)]
    for (fault, backend), c in counts.items():
        rows.append(f"| {fault} | {backend} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", default=",".join(CLASSES))
    p.add_argument("--backends", default="jax,megatron")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    import platform

    t0 = time.time()
    counts, _ = campaign(
        args.trials, args.seed, tuple(args.classes.split(",")), tuple(args.backends.split(",")), args.steps
    )
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), {time.time() - t0:.0f}s, seed {args.seed}")
    print(table(counts))
    bad = sum(c["silently wrong"] + c["data lost"] for c in counts.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
