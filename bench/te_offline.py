"""Transformer Engine on an offline GPU machine: packed here into carries, installed there.

    python bench/te_offline.py pack --out .whl/te DIR   # here: DIR holds the TE wheel, the torch sdist, extra wheels
    python bench/te_offline.py install --parts .whl/te --target /tmp/site   # there, once every carry is in

What has to travel (measured 2026-12-07): the core wheel transformer_engine_cu13-2.20.2 (276.5 MB,
one 343.5 MB libtransformer_engine.so in it), the torch extension transformer_engine_torch-2.20.2
(source only, a 0.5 MB sdist: 33 C++ files, a `CppExtension` — no .cu, so g++ against the installed
torch, not nvcc, builds it), and pydantic with its own needs (transformer_engine.common.recipe
imports it; the GPU image lacks it: pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions), and the `transformer_engine` meta-package wheel 2.20.2 (1.2 MB: TE refuses to
load its torch extension unless the distributions transformer-engine, transformer-engine-cu13 and
transformer_engine_torch are all installed at one version).
The image has the rest (torch 2.11+cu130, einops, onnx, onnxscript, packaging, setuptools, pybind11,
ninja).

Why in parts: a device call carries at most 64 MiB, the repository's working tree included
(~19 MiB now), so a carry holds 64 MiB - the tree - 1 MiB (`pack` measures the tree: ~44 MiB
today). Compression does not pay: the .so is 77 % CUDA fatbin (251 MiB of uncompressed cubins for
sm_75/80/89/90/100/103/107/120; sm_90's share is 17.5 MiB), and zstd -19 --long takes it only to
76 % (zstd -3: 78 %) after 6 CPU minutes. Keeping only the sm_90 cubins would cut ~233 MiB, but
that means rewriting the ELF's .nv_fatbin section with no cuobjdump/nvprune here to check it: not done.
So 267.9 MiB of files -> 7 carries of <= 44 MiB; ignored paths stay on a warm machine between
calls, so the carries accumulate there as long as each call follows the last within the machine's
~30 s idle window. The calls (`pack` prints what each carry holds):
  calls 1-6   command `ls .whl/te`, carry [".whl/te/carry-K", ".whl/te/manifest.json"]
  call 7      command `bash bench/device_check.sh`, timeout_s 600, carry [".whl/te/carry-7",
              ".whl/te/manifest.json", and the top-level .whl/*.whl it needs (megatron-core ...)]

The plan in device time (15 min per session; estimates where no device confirmed them):
  start of the machine            1-2 min
  7 carry calls (one carry each)  ~20-30 s each (transfer + `ls`): ~3 min
  install (verify, reassemble, pip --target)           ~0.5 min
  build the torch extension (33 C++ TUs with torch and pybind11 headers, MAX_JOBS=16 on 16
  cores: ~3 waves of ~40-60 s each + the link)          ~3-4 min
  -> carrying and installing fit (~5 min, ~10 left for the 8-minute check); the build does not
     fit beside a whole check: over 15 min in one session.
So in the first session with a device, `bash bench/device_check.sh` (which runs `install` itself
when .whl/te holds a manifest, its --budget counting the build) spends ~4 of its 8 minutes building
and profiles what fits in the rest; `install --build-wheel-to $OUT` brings the extension back as a
wheel (expected a few MiB, under the 16 MiB a returned file may have: an estimate). Packed with the
rest, it spares every later session the build: ~5 min to carry and install, then the whole check.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL_LIMIT = 64 * 2**20  # what one device call may carry, the working tree included
MARGIN = 2**20
MANIFEST = "manifest.json"
CHUNK = 2**20


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes(root=ROOT) -> int:
    """Bytes of what a device call sends of this checkout: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout
    return sum(
        os.path.getsize(os.path.join(root, p))
        for p in out.decode().split("\0")
        if p and os.path.isfile(os.path.join(root, p))
    )


# --- pack (here) ---------------------------------------------------------------------------------


def pack(files, out, carry_bytes=None):
    """Split `files` into carries of at most `carry_bytes` (default: what a call leaves beside the
    tree) under out/carry-N/, with out/manifest.json. Refuses a non-empty `out`."""
    if carry_bytes is None:
        carry_bytes = CALL_LIMIT - tree_bytes() - MARGIN
    if carry_bytes <= 0:
        raise ValueError(f"the working tree leaves no room in a {CALL_LIMIT >> 20} MiB call for a carry")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty: pack into a new directory (parts are never overwritten)")
    os.makedirs(out, exist_ok=True)
    manifest = dict(carry_bytes=carry_bytes, files=[], carries=[])
    used = carry_bytes  # the first piece opens carry-1
    for path in files:
        entry = dict(name=os.path.basename(path), size=os.path.getsize(path), sha256=_sha256(path), parts=[])
        left = entry["size"]
        with open(path, "rb") as fh:
            while True:
                if used >= carry_bytes:
                    manifest["carries"].append(f"carry-{len(manifest['carries']) + 1}")
                    os.makedirs(os.path.join(out, manifest["carries"][-1]), exist_ok=True)
                    used = 0
                data = fh.read(min(carry_bytes - used, left))
                part = f"{manifest['carries'][-1]}/{entry['name']}.part{len(entry['parts']):03d}"
                _write_new(os.path.join(out, part), data)
                entry["parts"].append(dict(path=part, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
                used, left = used + len(data), left - len(data)
                if left == 0:
                    break
        manifest["files"].append(entry)
    _write_new(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _write_new(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


# --- install (there) -----------------------------------------------------------------------------


class PartError(RuntimeError):
    pass


def verify_parts(parts_dir):
    """The manifest, after checking every part's size and sha256; raises PartError naming the part."""
    path = os.path.join(parts_dir, MANIFEST)
    if not os.path.exists(path):
        raise PartError(f"{path} is missing: carry the carry with the manifest (pack writes it beside the carries)")
    with open(path) as fh:
        manifest = json.load(fh)
    missing, bad = [], []
    for entry in manifest["files"]:
        for part in entry["parts"]:
            p = os.path.join(parts_dir, part["path"])
            if not os.path.exists(p):
                missing.append(part["path"])
            elif os.path.getsize(p) != part["size"] or _sha256(p) != part["sha256"]:
                bad.append(part["path"])
    if missing or bad:
        raise PartError(
            f"{parts_dir}: "
            + "; ".join(
                s
                for s in (
                    f"missing parts {missing} (carry them: a call per carry)" if missing else "",
                    f"corrupt parts {bad} (size or sha256 differs from {MANIFEST}: carry them again)" if bad else "",
                )
                if s
            )
        )
    return manifest


def reassemble(parts_dir, manifest, dest):
    """Each file of the manifest rebuilt under dest, its sha256 checked; returns the paths."""
    os.makedirs(dest, exist_ok=True)
    paths = []
    for entry in manifest["files"]:
        final = os.path.join(dest, entry["name"])
        tmp = final + ".tmp"
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in entry["parts"]:
                with open(os.path.join(parts_dir, part["path"]), "rb") as fh:
                    for block in iter(lambda: fh.read(CHUNK), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != entry["sha256"]:
            os.remove(tmp)
            raise PartError(f"{entry['name']}: reassembled sha256 {h.hexdigest()} != manifest {entry['sha256']}")
        os.replace(tmp, final)
        paths.append(final)
    return paths


def check_record(wheel):
    """Every file of a wheel against its RECORD (sha256 and size); raises naming the first mismatch."""
    with zipfile.ZipFile(wheel) as zf:
        record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise PartError(f"{wheel}: no .dist-info/RECORD")
        rows = list(csv.reader(io.TextIOWrapper(zf.open(record), encoding="utf-8")))
        for name, digest, size in (r for r in rows if r and r[1]):
            algo, _, want = digest.partition("=")
            h = hashlib.new(algo)
            with zf.open(name) as fh:
                for block in iter(lambda: fh.read(CHUNK), b""):
                    h.update(block)
            got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
            if got != want or (size and int(size) != zf.getinfo(name).file_size):
                raise PartError(f"{wheel}: {name} differs from its RECORD entry")
    return len(rows)


def pip_install(wheels, target):
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", target, *wheels]
    subprocess.run(cmd, check=True)


def torch_build_env(target, jobs=None):
    """The environment of the extension's build: offline, pytorch only, Hopper."""
    env = dict(os.environ)
    env.update(
        NVTE_FRAMEWORK="pytorch",
        # Build here: setup.py would otherwise first try to download a prebuilt wheel.
        NVTE_PYTORCH_FORCE_BUILD="TRUE",
        NVTE_CUDA_ARCHS="90",
        TORCH_CUDA_ARCH_LIST="9.0",
        MAX_JOBS=str(jobs or os.cpu_count() or 1),
        PYTHONPATH=target + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
    )
    return env


def torch_build_command(sdist_dir, wheel_dir):
    """pip wheel of the unpacked sdist with the machine's torch (no index, no build isolation)."""
    return [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--wheel-dir",
        wheel_dir,
        sdist_dir,
    ]


def build_torch_extension(sdist, target, wheel_dir, jobs=None):
    """Builds transformer_engine_torch from its sdist into a wheel in wheel_dir; returns its path."""
    os.makedirs(wheel_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="te-torch-") as work:
        with tarfile.open(sdist) as tf:
            tf.extractall(work, filter="data")
        (src,) = [os.path.join(work, d) for d in os.listdir(work)]
        cmd = torch_build_command(src, wheel_dir)
        if subprocess.run(cmd, env=torch_build_env(target, jobs)).returncode:
            raise PartError(
                f"building the torch extension from {os.path.basename(sdist)} failed (pip's output above; it "
                f"needs the GPU machine's torch, setuptools, CUDA headers and nvcc): {' '.join(cmd)}"
            )
    built = [f for f in os.listdir(wheel_dir) if f.startswith("transformer_engine_torch-") and f.endswith(".whl")]
    if not built:
        raise RuntimeError(f"pip wheel wrote no transformer_engine_torch wheel into {wheel_dir}")
    return os.path.join(wheel_dir, built[0])


def install(parts_dir, target, build_wheel_to=None, jobs=None):
    """Verify, reassemble, check RECORDs, install into target; build the torch extension from its
    sdist unless a built transformer_engine_torch wheel came with the parts."""
    manifest = verify_parts(parts_dir)
    files = reassemble(parts_dir, manifest, os.path.join(parts_dir, "assembled"))
    wheels = [f for f in files if f.endswith(".whl")]
    for w in wheels:
        check_record(w)
    pip_install(wheels, target)
    sdists = [f for f in files if f.endswith(".tar.gz") and os.path.basename(f).startswith("transformer_engine_torch-")]
    has_ext = any(os.path.basename(w).startswith("transformer_engine_torch-") for w in wheels)
    # Built by an earlier run on this machine: the build is minutes, the check is not.
    has_ext = has_ext or any(n.startswith("transformer_engine_torch") and n.endswith(".so") for n in os.listdir(target))
    built = None
    if sdists and not has_ext:
        built = build_torch_extension(sdists[0], target, build_wheel_to or os.path.join(parts_dir, "built"), jobs)
        pip_install([built], target)
    return dict(installed=[os.path.basename(w) for w in wheels], built=built)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="split files into carries with a manifest")
    p.add_argument("files", nargs="+", help="files, or directories standing for their files")
    p.add_argument("--out", required=True)
    p.add_argument("--carry-mib", type=float, help="carry size (default: 64 MiB - the working tree - 1 MiB)")
    i = sub.add_parser("install", help="verify, reassemble and install (on the GPU machine)")
    i.add_argument("--parts", required=True)
    i.add_argument("--target", required=True)
    i.add_argument("--build-wheel-to", help="where the built torch extension wheel goes (e.g. $OUT)")
    i.add_argument("--jobs", type=int, help="MAX_JOBS of the extension build (default: all CPUs)")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        size = None if args.carry_mib is None else int(args.carry_mib * 2**20)
        files = []
        for f in args.files:  # a directory stands for its files
            files += sorted(os.path.join(f, n) for n in os.listdir(f)) if os.path.isdir(f) else [f]
        m = pack(files, args.out, size)
        print(f"{len(m['carries'])} carries of <= {m['carry_bytes'] / 2**20:.1f} MiB under {args.out}:")
        for c in m["carries"]:
            names = [p["path"] for f in m["files"] for p in f["parts"] if p["path"].startswith(c + "/")]
            print(f"  {c}: {', '.join(os.path.basename(n) for n in names)}")
        return 0
    try:
        got = install(args.parts, args.target, args.build_wheel_to, args.jobs)
    except PartError as e:
        print(f"te_offline install: {e}", file=sys.stderr)
        return 2
    print(
        f"installed into {args.target}: {', '.join(got['installed'])}"
        + (f"; built {got['built']}" if got["built"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
