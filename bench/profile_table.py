"""Where a profiled train step's time goes: device ops bucketed by kind, one table per variant.

Reads the Chrome-format trace a profiler wrote (JAX: the `perfetto_trace.json.gz` of
`jax.profiler.trace(..., create_perfetto_trace=True)`, or its `*.trace.json.gz`; torch: the
`export_chrome_trace` JSON of `torch.profiler`), keeps the device ops inside the step windows (host
events named STEP_MARK around each profiled step), and splits the busy device time into

    attention fwd, attention bwd, matmuls, norms/elementwise, collectives, other

plus host gaps = step wall time - busy device time. Ops running at the same time (several CUDA
streams, nested CPU op events) are counted once: each instant goes to the first category in
CATEGORIES among the ops active then, so the buckets add up to the busy time exactly and
`collectives` is the communication no compute hides.

An op is classified by its kernel name (cuDNN/flash attention, cuBLAS/CUTLASS GEMMs, NCCL, XLA
fusion names) and, for XLA ops, by the optimized HLO of its module when given (`compiled.as_text()`):
a fusion holding a dot is a matmul, and an op whose JAX source stack passes through the attention
modules (ATTENTION_SOURCES) is attention — backward when its JAX name stack is a `transpose(...)`.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re

CATEGORIES = ("attention fwd", "attention bwd", "matmuls", "norms/elementwise", "other", "collectives")
TABLE_ORDER = ("attention fwd", "attention bwd", "matmuls", "norms/elementwise", "collectives", "other")
STEP_MARK = "mugv_step"
CONTROL_FLOW = ("while", "conditional", "call")
# The JAX attention code: an XLA op traced from here is attention, whatever its kind.
ATTENTION_SOURCES = (
    "mugv_jax/parallel/attention.py",
    "mugv_jax/parallel/blockwise.py",
    "mugv_jax/parallel/context_parallel.py",
)

_ATTENTION = re.compile(r"fmha|flash|sdpa|fused_attn|scaled_dot_product|attention", re.I)
_BACKWARD = re.compile(r"backward|bwd|bprop|dgrad|dq_dk|dkdv|_dq_|transpose\(", re.I)
_COLLECTIVE = re.compile(
    r"nccl|all[-_]?gather|all[-_]?reduce|reduce[-_]?scatter|collective[-_]?permute|all[-_]?to[-_]?all|"
    r"\bsend\b|\brecv\b|c10d::",
    re.I,
)
_MATMUL = re.compile(
    r"gemm|gemv|cublas|cutlass|nvjet|xmma|matmul|^dot\b|^dot\.|\bdot_general|convolution|linear|"
    r"aten::(mm|bmm|addmm|baddbmm|linear|matmul)\b|\b(mm|bmm|addmm)backward",
    re.I,
)
_MEMORY = re.compile(r"memcpy|memset|^copy(-start|-done)?(\.\d+)?$|host[-_]?offload|dynamic-update-slice", re.I)
_ELEMENTWISE = re.compile(
    r"fusion|elementwise|vectorized|reduce|norm|softmax|gelu|silu|rope|tanh|exp|add|mul|div|sub|"
    r"convert|cast|transpose|broadcast|select|triton|adam|foreach|unrolled|scatter|gather|sqrt|lerp|pow|"
    r"sigmoid|neg|abs|where|clamp|fill|zero|mean|sum|max|min",
    re.I,
)


# --- the HLO side --------------------------------------------------------------------------------


@dataclasses.dataclass
class HloOp:
    opcode: str
    calls: tuple[str, ...] = ()
    target: str = ""  # custom_call_target
    op_name: str = ""  # the JAX name stack (metadata op_name)
    files: tuple[str, ...] = ()  # source file of its innermost JAX frame
    # What a fusion or call holds (filled once the whole module is read).
    inner_opcodes: tuple[str, ...] = ()
    inner_files: tuple[str, ...] = ()
    inner_op_names: tuple[str, ...] = ()
    inner_dot_files: tuple[str, ...] = ()
    inner_dot_names: tuple[str, ...] = ()


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9\-]*)\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*[({].*\{\s*$")


def parse_hlo(text: str) -> dict[str, HloOp]:
    """Instruction name -> HloOp for every instruction of an optimized HLO module's text."""
    tables = _stack_tables(text)
    ops: dict[str, HloOp] = {}
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("}"):
            current = None
            continue
        head = _HEADER.match(line)
        if head and not line.startswith(" "):
            current = computations.setdefault(head.group(1), [])
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, rest = m.groups()
        code = _OPCODE.search(rest)
        if not code:
            continue
        calls = tuple(re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest))
        calls += tuple(c for group in re.findall(r"called_computations=\{([^}]*)\}", rest) for c in _names(group))
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        files = re.findall(r'source_file="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        if frame:
            files += _frame_files(tables, int(frame.group(1)))
        ops[name] = HloOp(
            opcode=code.group(1),
            calls=calls,
            target=target.group(1) if target else "",
            op_name=op_name.group(1) if op_name else "",
            files=tuple(files),
        )
        current.append(name)

    # A fusion (or call) stands for what it calls: its dots, its custom calls, its sources.
    def inside(op, seen):
        if op.opcode in CONTROL_FLOW:
            return  # a while/conditional/call spans other ops, which have their own events
        for c in op.calls:
            if c in seen:
                continue
            seen.add(c)
            for n in computations.get(c, ()):
                yield ops[n]
                yield from inside(ops[n], seen)

    for op in ops.values():
        inner = list(inside(op, set()))
        op.inner_opcodes = tuple(sorted({i.opcode for i in inner} | {i.target for i in inner if i.target}))
        # Each distinct once: these travel back from the device in the ops file.
        op.inner_files = _distinct(f for i in inner for f in i.files)
        op.inner_op_names = _distinct(i.op_name for i in inner if i.op_name)
        op.inner_dot_files = _distinct(f for i in inner if i.opcode in ("dot", "convolution") for f in i.files)
        op.inner_dot_names = _distinct(i.op_name for i in inner if i.opcode in ("dot", "convolution"))
    return ops


def _distinct(items):
    return tuple(dict.fromkeys(items))


def _names(group):
    return [g.strip().lstrip("%") for g in group.split(",") if g.strip()]


def _stack_tables(text):
    """The FileNames / FileLocations / StackFrames tables newer XLA prints after the module."""
    tables = {"FileNames": {}, "FileLocations": {}, "StackFrames": {}}
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if not s or line.startswith("%") or line.startswith("ENTRY") or line.startswith("HloModule"):
            section = None if not s else section
            continue
        if section in tables:
            m = re.match(r"(\d+)\s+(.*)$", s)
            if m:
                tables[section][int(m.group(1))] = m.group(2)
    return tables


def _frame_files(tables, frame_id):
    """The file of an op's own (innermost) JAX source frame: where the primitive was called from.
    The callers are left out: they all lead back to the train step."""
    frame = tables["StackFrames"].get(frame_id, "")
    loc = re.search(r"file_location_id=(\d+)", frame)
    location = tables["FileLocations"].get(int(loc.group(1)), "") if loc else ""
    file_id = re.search(r"file_name_id=(\d+)", location)
    return [tables["FileNames"].get(int(file_id.group(1)), "").strip('"')] if file_id else []


# --- classification ------------------------------------------------------------------------------


def _is_attention_source(files):
    return any(f.replace("\\", "/").endswith(src) for f in files for src in ATTENTION_SOURCES)


def _is_backward_stack(op_name):
    # JAX names the backward pass transpose(jvp(...)); the forward that remat recomputes in it is
    # under rematted_computation: forward work, counted as such.
    return ("/transpose(" in op_name or op_name.startswith("transpose(")) and "rematted_computation" not in op_name


def classify(name: str, hlo_op: HloOp | None = None) -> str:
    """The category of one device op: its kernel/op name, then its HLO instruction when known."""
    words = name
    if hlo_op is not None:
        words = f"{name} {hlo_op.opcode} {hlo_op.target} " + " ".join(sorted(hlo_op.inner_opcodes))
    if _ATTENTION.search(name) or (hlo_op is not None and _ATTENTION.search(hlo_op.target)):
        return "attention bwd" if _BACKWARD.search(name + " " + (hlo_op.target if hlo_op else "")) else "attention fwd"
    if _COLLECTIVE.search(words):
        return "collectives"
    if hlo_op is not None:
        # A dot, convolution or cuBLAS call itself, or a fusion holding one: the matmul decides.
        own_dot = hlo_op.opcode in ("dot", "convolution") or bool(_MATMUL.search(hlo_op.target))
        has_dot = own_dot or bool(hlo_op.inner_dot_names) or "gemm" in words
        dot_files = hlo_op.files if own_dot else hlo_op.inner_dot_files
        files = dot_files if has_dot else hlo_op.files + hlo_op.inner_files
        if _is_attention_source(files):
            names = (hlo_op.op_name,) + (hlo_op.inner_dot_names if has_dot else hlo_op.inner_op_names)
            return "attention bwd" if any(_is_backward_stack(n) for n in names) else "attention fwd"
        if has_dot or _MATMUL.search(words):
            return "matmuls"
        if _MEMORY.search(name) or hlo_op.opcode in ("copy-start", "copy-done", "dynamic-update-slice"):
            return "other"
        if hlo_op.opcode in ("fusion",) or _ELEMENTWISE.search(hlo_op.opcode) or _ELEMENTWISE.search(name):
            return "norms/elementwise"
        return "other"
    if _MATMUL.search(name):
        return "matmuls"
    if _MEMORY.search(name):
        return "other"
    if _ELEMENTWISE.search(name):
        return "norms/elementwise"
    return "other"


# --- the trace side ------------------------------------------------------------------------------


@dataclasses.dataclass
class Profile:
    steps: int
    wall_us: float  # the step windows, summed
    busy_us: float  # device busy inside them
    buckets_us: dict  # category -> time inside them
    top: list  # (name, category, µs) of the longest ops

    @property
    def host_gap_us(self):
        return self.wall_us - self.busy_us


def find_trace(directory: str) -> str:
    """The Chrome-format trace under a profiler's log directory (newest run)."""
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz", "*.pt.trace.json", "*.json"):
        found = sorted(glob.glob(os.path.join(directory, "**", pattern), recursive=True), key=os.path.getmtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no profiler trace (perfetto_trace.json.gz, *.trace.json.gz) under {directory}")


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


_NOT_OPS = re.compile(r"XLA Modules|Steps|TraceMe|Name Scope|Source|Framework|XLA Ops|python", re.I)


def device_ops(events: list[dict]) -> list[dict]:
    """The complete ('X') events that are device work.

    torch: CUDA kernels/memcpys when there are any, else the CPU op events. JAX: on a GPU/TPU
    the events of the device's stream lines; on the CPU backend the events carrying an `hlo_op`.
    """
    complete = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
    kernels = [e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if kernels:
        return kernels
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    device_pids = {p for p, n in procs.items() if n.startswith("/device:") and "CPU" not in n}
    if device_pids:
        ops = []
        for pid in device_pids:
            lines = {t for (p, t), n in threads.items() if p == pid}
            streams = {t for t in lines if threads[(pid, t)].lower().startswith("stream")}
            keep = streams or {t for t in lines if threads[(pid, t)] == "XLA Ops"}
            ops += [e for e in complete if e["pid"] == pid and e.get("tid") in keep]
        return ops
    if any(e.get("cat") == "cpu_op" for e in complete):
        return [e for e in complete if e.get("cat") == "cpu_op"]
    return [
        e
        for e in complete
        if "hlo_op" in e.get("args", {}) and not _NOT_OPS.search(threads.get((e["pid"], e.get("tid")), ""))
    ]


def step_windows(events: list[dict]) -> list[tuple[float, float]]:
    """(start, end) µs of the host-side STEP_MARK events (not torch's device-side copies)."""
    marks = [
        e
        for e in events
        if e.get("ph") == "X" and e.get("name") == STEP_MARK and e.get("cat") not in ("gpu_user_annotation",)
    ]
    return sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in marks)


def _self_time(ops):
    """(event, hlo op, start, end) pieces of each event's own time: where events nest on one
    thread (torch's CPU ops inside autograd nodes), a parent's time inside a child is the child's."""
    by_thread: dict[tuple, list] = {}
    for e, op in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append((float(e["ts"]), float(e["dur"]), e, op))
    for items in by_thread.values():
        items.sort(key=lambda x: (x[0], -x[1]))
        stack, cursor = [], None  # stack of (end, event, op)
        for start, dur, e, op in items + [(float("inf"), 0.0, None, None)]:
            while stack and stack[-1][0] <= start:
                end, pe, pop = stack.pop()
                if end > cursor:
                    yield pe, pop, cursor, end
                cursor = max(cursor, end)
            if e is None:
                break
            if stack and start > cursor:
                yield stack[-1][1], stack[-1][2], cursor, start
            cursor = start
            stack.append((min(start + dur, stack[-1][0]) if stack else start + dur, e, op))


def step_ops(events: list[dict], hlo: dict[str, HloOp] | None = None):
    """(step windows, [(event, its HloOp or None, the HLO name it was found by)]) of the device ops
    overlapping a window."""
    windows = step_windows(events)
    if not windows:
        raise ValueError(f"no {STEP_MARK!r} step events in the trace: wrap each profiled step in one")
    hlo = hlo or {}
    ops = []
    for e in device_ops(events):
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if not any(start < hi and end > lo for lo, hi in windows):
            continue
        key = next((k for k in (e.get("args", {}).get("hlo_op", ""), e.get("name", "")) if k in hlo), "")
        op = hlo.get(key)
        if op is None or op.opcode not in CONTROL_FLOW:  # a loop spans its body's ops, which have events
            ops.append((e, op, key))
    return windows, ops


def bucket(events: list[dict], hlo: dict[str, HloOp] | None = None, top: int = 6) -> Profile:
    """Bucket the device ops of a trace's step windows (see the module docstring)."""
    windows, ops = step_ops(events, hlo)
    return _bucket(windows, [(e, op) for e, op, _ in ops], top)


def _bucket(windows, ops, top):
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    edges = []  # (time, +1/-1, category index)
    per_name: dict[tuple, float] = {}
    for e, op, start, end in _self_time(ops):
        name = e.get("name", "")
        cat = classify(name, op)
        clipped = 0.0
        for lo, hi in windows:
            s, t = max(start, lo), min(end, hi)
            if t > s:
                edges += [(s, 1, rank[cat]), (t, -1, rank[cat])]
                clipped += t - s
        if clipped:
            per_name[(name, cat)] = per_name.get((name, cat), 0.0) + clipped
    edges.sort(key=lambda x: (x[0], x[1]))
    active = [0] * len(CATEGORIES)
    buckets = dict.fromkeys(CATEGORIES, 0.0)
    last = None
    for t, delta, cat in edges:
        if last is not None and t > last:
            first = next((i for i, n in enumerate(active) if n > 0), None)
            if first is not None:
                buckets[CATEGORIES[first]] += t - last
        active[cat] += delta
        last = t
    longest = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return Profile(
        steps=len(windows),
        wall_us=sum(hi - lo for lo, hi in windows),
        busy_us=sum(buckets.values()),
        buckets_us=buckets,
        top=[(n, c, us) for (n, c), us in longest],
    )


# --- what comes back from the device: the ops, small enough to re-bucket here ------------------


def extract(events: list[dict], hlo: dict[str, HloOp] | None = None) -> dict:
    """The step windows, the device ops in them and the HLO instructions they name, as JSON-able
    data: a trace's few MiB reduced to what bucketing reads, so a classification can be revised
    on the CPU after the device is gone (bucket_extract)."""
    windows, ops = step_ops(events, hlo)
    used = {key: dataclasses.asdict(op) for _, op, key in ops if op is not None}
    rows = [[e.get("name", ""), key, float(e["ts"]), float(e["dur"]), e.get("pid"), e.get("tid")] for e, _, key in ops]
    return dict(windows=windows, ops=rows, hlo=used)


def bucket_extract(data: dict, top: int = 6) -> Profile:
    hlo = {
        k: HloOp(**{f: tuple(v) if isinstance(v, list) else v for f, v in d.items()}) for k, d in data["hlo"].items()
    }
    ops = [
        (dict(name=name, ts=ts, dur=dur, pid=pid, tid=tid), hlo.get(key))
        for name, key, ts, dur, pid, tid in data["ops"]
    ]
    return _bucket([tuple(w) for w in data["windows"]], ops, top)


def profile_dir(directory: str, hlo_text: str | None = None) -> tuple[Profile, dict]:
    """The profile of the newest trace under a profiler log directory, and its extract."""
    events = load_events(find_trace(directory))
    hlo = parse_hlo(hlo_text) if hlo_text else None
    return bucket(events, hlo), extract(events, hlo)


def format_table(title: str, prof: Profile) -> str:
    """One table: ms per step and % of the step for each bucket, host gaps and the step."""
    per = 1e3 * prof.steps  # µs summed over steps -> ms per step
    wall = prof.wall_us or 1.0
    lines = [title, f"  {'bucket':<20} {'ms/step':>10} {'% step':>7}"]
    for cat in TABLE_ORDER:
        lines.append(f"  {cat:<20} {prof.buckets_us[cat] / per:>10.3f} {100 * prof.buckets_us[cat] / wall:>7.1f}")
    lines.append(f"  {'host gaps':<20} {prof.host_gap_us / per:>10.3f} {100 * prof.host_gap_us / wall:>7.1f}")
    lines.append(f"  {'step (wall)':<20} {prof.wall_us / per:>10.3f} {100.0:>7.1f}   ({prof.steps} profiled)")
    for name, cat, us in prof.top:
        lines.append(f"    longest: {us / per:9.3f} ms/step  {cat:<18} {name[:90]}")
    return "\n".join(lines)


def as_dict(prof: Profile) -> dict:
    """The profile in ms per step, for the JSON of results."""
    per = 1e3 * prof.steps
    return dict(
        steps=prof.steps,
        step_ms=prof.wall_us / per,
        busy_ms=prof.busy_us / per,
        host_gaps_ms=prof.host_gap_us / per,
        buckets_ms={c: prof.buckets_us[c] / per for c in TABLE_ORDER},
        longest=[dict(name=n, category=c, ms=us / per) for n, c, us in prof.top],
    )


def main(argv=None):
    """Print the tables of a device check's ops file again (bucketed by this module as it is now)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("ops", help="device_check_ops.json.gz from bench/device_check.py --out")
    args = ap.parse_args(argv)
    with gzip.open(args.ops, "rt") as fh:
        parts = json.load(fh)
    for name, data in parts.items():
        print(format_table(f"{name} (re-bucketed from {os.path.basename(args.ops)})", bucket_extract(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
