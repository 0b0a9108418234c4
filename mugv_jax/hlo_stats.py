"""What a compiled step does on each device, read off XLA's output: the collectives and the bytes
they move per step (loops counted by their trip counts) in the module as the SPMD partitioner
leaves it (`partitioned_module`), and the partitioner's involuntary full rematerializations (it
logs them while compiling; `capture_compile_log` keeps that log).

Bytes are what one device sends per execution with ring algorithms, for a group of g devices:
all-gather (g−1)/g of its result, reduce-scatter (g−1)/g of its operand, all-reduce twice
(g−1)/g of its operand, all-to-all (g−1)/g of its operand, collective-permute its operand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile

_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls)=%?([\w.\-]+)")
REMAT_WARNING = "Involuntary full rematerialization"


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    shape: str  # the result's type, as HLO prints it
    group: int  # devices per replica group
    span: int  # consecutive device ids one group spans (for node locality); 0 when unknown
    executions: int  # per step: the product of the trip counts of the loops around it
    bytes: float  # sent per device per execution

    @property
    def bytes_per_step(self) -> float:
        return self.bytes * self.executions


def _array_bytes(types: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([0-9,]*)\]", types):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def _span(devices) -> int:
    return int(max(devices) - min(devices) + 1) if len(devices) else 0


def _group(line: str) -> tuple[int, int]:
    """(devices per group, id span of the first group) of a collective."""
    import numpy as np

    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:  # the partitioner's mesh form: mesh[axes=sizes] {grouped axes}, devices row-major
        axes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
        grouped = set(re.findall(r"'(\w+)'", m.group(2)))
        size = math.prod(n for a, n in axes if a in grouped)
        first = next((i for i, (a, _) in enumerate(axes) if a in grouped), len(axes))
        return size, math.prod(n for _, n in axes[first:])
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if m:  # iota form [groups, size]<=[dims]T(perm)
        shape = [int(v) for v in m.group(1).split(",")]
        ids = np.arange(math.prod(int(v) for v in m.group(2).split(","))).reshape(
            [int(v) for v in m.group(2).split(",")]
        )
        if m.group(3):
            ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        first = ids.reshape(shape)[(0,) * (len(shape) - 1)]
        return shape[-1], _span(first)
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        devices = [int(v) for v in m.group(1).split(",") if v]
        return len(devices), _span(devices)
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m:
        pairs = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
        return 2, max((abs(a - b) + 1 for a, b in pairs), default=0)
    return 1, 1


def _computations(text: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    return comps


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's annotation when present, else the bound of a scan's
    condition (`counter < N`, the counter starting at 0)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if m:
        return int(m.group(1))
    m = re.search(r"condition=%?([\w.\-]+)", line)
    cond = comps.get(m.group(1), []) if m else []
    if any("direction=LT" in c for c in cond):
        bounds = [int(v) for c in cond for v in re.findall(r"s32\[\] constant\((\d+)\)", c)]
        if len(bounds) == 1:
            return bounds[0]
    return 1


def _executions(comps: dict[str, list[str]], text: str) -> dict[str, int]:
    """How often each computation runs per execution of the entry computation."""
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", text, re.M)
    if not entry:
        return {name: 1 for name in comps}
    counts = {name: 0 for name in comps}
    counts[entry.group(1)] = 1
    order, seen, i = [entry.group(1)], {entry.group(1)}, 0
    while i < len(order):  # breadth-first over the call graph (a DAG): parents before children
        name = order[i]
        i += 1
        for line in comps.get(name, ()):
            trips = _trip_count(line, comps) if " while(" in line else 1
            children = _CALLS.findall(line)
            m = re.search(r"branch_computations=\{([^}]*)\}", line)
            if m:
                children += [c.strip().lstrip("%") for c in m.group(1).split(",")]
            for child in children:
                if child in comps:
                    counts[child] += counts[name] * trips
                    if child not in seen:
                        seen.add(child)
                        order.append(child)
    return counts


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled module's HLO text (`compiled.as_text()`)."""
    comps = _computations(hlo_text)
    runs = _executions(comps, hlo_text)
    types = {}
    for lines in comps.values():
        for line in lines:
            m = _DEF.match(line)
            if m:
                types[m.group(1)] = m.group(2)
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = _DEF.match(line)
            if not m:
                continue
            op = m.group(3).removesuffix("-start")
            if op not in _OPS:
                continue
            args = line[m.end() :].split(")", 1)[0]
            operand = sum(_array_bytes(types.get(a, "")) for a in re.findall(r"%([\w.\-]+)", args))
            group, span = _group(line)
            sent = {
                "all-gather": operand * (group - 1),
                "reduce-scatter": operand * (group - 1) / group,
                "all-reduce": 2 * operand * (group - 1) / group,
                "all-to-all": operand * (group - 1) / group,
                "collective-permute": operand,
            }[op]
            out.append(Collective(op, m.group(2), group, span, runs.get(name, 1), float(sent)))
    return out


SPMD_DUMP = {
    "xla_dump_hlo_pass_re": "spmd-partitioning",
    "xla_dump_hlo_pipeline_re": "spmd-partitioner",
    "xla_dump_hlo_as_text": True,
}


@contextlib.contextmanager
def partitioned_module():
    """Compiler options that dump the module right after SPMD partitioning, and (once the
    compile inside the context is done) its HLO text in the yielded list. The collectives are
    read there: later, the CPU compiler widens bfloat16 to float32 (CPU kernels compute in
    float32), which would count twice the bytes a TPU or GPU moves."""
    with tempfile.TemporaryDirectory(prefix="mugv-spmd-") as tmp:
        out: list[str] = []
        yield {"xla_dump_to": tmp, **SPMD_DUMP}, out
        found = sorted(f for f in os.listdir(tmp) if "after_spmd-partitioning" in f and f.endswith(".txt"))
        if found:
            with open(os.path.join(tmp, found[-1])) as f:
                out.append(f.read())


def seconds(found: list[Collective], link: float, node: int = 0, network: float = 0.0) -> float:
    """Time to move the step's collective bytes: over `link` bytes/s per device, or `network`
    for a group spanning more than a `node` of consecutive devices (GPUs across nodes)."""
    total = 0.0
    for c in found:
        bandwidth = network if node and network and c.span > node else link
        total += c.bytes_per_step / bandwidth
    return total


def summarize(found: list[Collective]) -> dict[str, dict]:
    """{op: {"count": per step, "bytes": per device per step}}."""
    out = {}
    for c in found:
        s = out.setdefault(c.op, {"count": 0, "bytes": 0.0})
        s["count"] += c.executions
        s["bytes"] += c.bytes_per_step
    return out


@contextlib.contextmanager
def capture_compile_log():
    """Collect what XLA's C++ code writes to stderr (its log) inside this context, and pass it on.
    Yields a list that holds the text once the context exits."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            out.append(text)
            sys.stderr.write(text)


def involuntary_rematerializations(log: str) -> list[str]:
    """The SPMD partitioner's involuntary full rematerializations in a compile log, one line each."""
    return [line.strip() for line in log.splitlines() if REMAT_WARNING in line]
