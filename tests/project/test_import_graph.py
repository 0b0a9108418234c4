"""The package graph has one direction and no cycles.

    mugv (framework-free core) ← mugv_jax, mugv_megatron (backends) ← converters, mugv_data,
    main_job (apps)

configs/ may import the core only. Inside a backend the rooms (subpackages, and top-level modules
such as mugv_jax/plan.py) stand in layers, lowest first (LAYERS): a module imports its own room and
rooms of lower layers, never one beside or above it. Every import counts, also those inside functions: a lazy
import hides a cycle from Python, not from a reader. The test parses the sources (nothing is
imported), so it is cheap and sees every file.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("mugv", "mugv_jax", "mugv_megatron", "converters", "mugv_data", "configs", "main_job")
# What each top-level package may import of ours (besides itself).
ALLOWED = {
    "mugv": set(),
    "configs": {"mugv"},
    "mugv_jax": {"mugv"},
    "mugv_megatron": {"mugv"},
    "converters": {"mugv", "mugv_jax", "mugv_megatron"},
    "mugv_data": {"mugv", "mugv_jax"},
    "main_job": {"mugv", "mugv_jax", "mugv_data", "configs", "converters"},
}
# The rooms of each backend by layer, lowest first. The JAX preference trainer lives in train/ (a
# training mode, like Megatron's), so train/ never reaches up into recipe/. compilation_cache.py
# and backend_options.py import nothing of ours: the trainers and sampler CLIs call the first at
# start-up, the VAE's jits take their compiler options from the second.
LAYERS = {
    "mugv_jax": (
        ("parallel", "hlo_stats", "compilation_cache", "backend_options"),
        ("dit",),
        ("sample",),
        ("train",),
        ("recipe", "vae", "plan"),
        ("export",),
    ),
    # memory.py and plan.py are the framework-free planner (the trainer checks its batch split).
    "mugv_megatron": (("memory",), ("plan",), ("parallel",), ("model",), ("train",)),
}


def _modules():
    """{module name: path} for every source file of our packages."""
    out = {}
    for pkg in PACKAGES:
        for root, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module prefix of an imported name (a.b.c where c may be a symbol)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def imports(module: str) -> set[str]:
    tree = ast.parse(open(MODULES[module]).read(), MODULES[module])
    is_pkg = MODULES[module].endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                pkg = pkg if is_pkg else pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from X import Y` imports module X.Y if there is one, else the symbol Y of X.
            names = [f"{base}.{a.name}" for a in node.names]
        for n in names:
            target = _resolve(n)
            # A module's own parent packages are initialised before it anyway: not an edge.
            if target and target != module and not module.startswith(target + "."):
                out.add(target)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def _cycles(nodes, edges):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_top_level_packages_import_in_one_direction():
    bad = sorted(
        {
            (m, t)
            for m, ts in GRAPH.items()
            for t in ts
            if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]
        }
    )
    assert not bad, "imports against the package direction:\n" + "\n".join(f"  {m} -> {t}" for m, t in bad)
    top = {p: {t.split(".")[0] for m, ts in GRAPH.items() if m.split(".")[0] == p for t in ts} - {p} for p in PACKAGES}
    assert not _cycles(PACKAGES, top)


def _room(module: str) -> str | None:
    """The room of a backend module (`mugv_jax.train.step` → "train"); None for the package file."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_edges(graph: dict[str, set[str]], package: str, layers) -> list[tuple[str, str]]:
    """(module, target) for every import inside `package` from a room to one beside or above it."""
    level = {room: i for i, rooms in enumerate(layers) for room in rooms}
    bad = []
    for m, ts in graph.items():
        if m.split(".")[0] != package or _room(m) is None:
            continue
        for t in ts:
            here, there = _room(m), _room(t)
            if t.split(".")[0] == package and there is not None and there != here and level[there] >= level[here]:
                bad.append((m, t))
    return sorted(bad)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_backend_rooms_import_only_downwards(package):
    rooms = {_room(m) for m in MODULES if m.split(".")[0] == package} - {None}
    listed = {r for layer in LAYERS[package] for r in layer}
    assert rooms == listed, f"{package}: place every room in LAYERS (unlisted {rooms - listed}, gone {listed - rooms})"
    bad = upward_edges(GRAPH, package, LAYERS[package])
    assert not bad, f"imports running back up inside {package} (layers {LAYERS[package]}):\n" + "\n".join(
        f"  {m} -> {t}" for m, t in bad
    )


def test_the_layer_check_sees_an_upward_edge():
    # The edge this layering removed (train/backend.py -> recipe/preference.py), a sideways one
    # between rooms of one layer, and a downward one that is allowed.
    layers = LAYERS["mugv_jax"]
    graph = {
        "mugv_jax.train.backend": {"mugv_jax.recipe.preference", "mugv_jax.dit.model"},
        "mugv_jax.vae.training": {"mugv_jax.plan", "mugv_jax.train.checkpointing"},
    }
    assert upward_edges(graph, "mugv_jax", layers) == [
        ("mugv_jax.train.backend", "mugv_jax.recipe.preference"),
        ("mugv_jax.vae.training", "mugv_jax.plan"),
    ]


@pytest.mark.parametrize("package", ["mugv", "mugv_jax", "mugv_megatron", "converters", "mugv_data", "main_job"])
def test_no_import_cycles_inside_a_package(package):
    nodes = [m for m in MODULES if m.split(".")[0] == package]
    edges = {m: {t for t in GRAPH[m] if t.split(".")[0] == package} for m in nodes}
    cycles = _cycles(nodes, edges)
    assert not cycles, f"import cycles in {package}: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports_and_cycles():
    # The checker itself: a lazy import is an edge, and a two-module loop is a cycle.
    # posthoc_ema imports the orbax reader inside a function only.
    assert "mugv.io.orbax" in imports("mugv_jax.recipe.posthoc_ema")
    assert _cycles(["a", "b", "c"], {"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles(["a", "b"], {"a": {"b"}}) == []


# The convert path, top to bottom (docs/architecture.md, "Checkpoint formats"): a reader who
# follows `python -m converters convert` from the CLI meets each module before any module it
# imports, and never has to climb back up. mugv.io.weights (init_from) sits beside the writers.
CONVERT_PATH = [
    ["converters.__main__"],
    ["converters.cli"],
    ["converters.adapters"],
    ["converters.convert"],
    ["converters.vae"],
    ["converters.detect", "converters.pipeline", "converters.formats"],
    ["converters.formats.jax", "converters.formats.megatron", "mugv.io.weights"],
    ["mugv.io.spec", "mugv.io.null_text", "mugv.io.latents", "mugv.io.text_features"],
    ["mugv.io.release", "mugv.io.orbax", "mugv.io.torch_dist"],
    ["mugv.io.megatron", "mugv.io.staging", "mugv.io.torch_cpu", "mugv.safetensors_io", "mugv.io.peft"],
    ["mugv.io.torchzip"],
    [
        "mugv.io.base",
        "mugv.io.atomic",
        "mugv.io.digest",
        "mugv.io.mismatch",
        "mugv.layouts.jax",
        "mugv.layouts.megatron",
    ],
    ["mugv.schema", "mugv.lora"],
    ["mugv.config", "mugv.vae_config"],
]


def test_the_convert_path_reads_top_down():
    level = {m: i for i, layer in enumerate(CONVERT_PATH) for m in layer}
    io_modules = {m for m in MODULES if m.startswith(("mugv.io.", "converters.formats."))}
    assert io_modules <= set(level), f"place these in CONVERT_PATH: {sorted(io_modules - set(level))}"
    bad = sorted(
        f"{m} -> {t}"
        for m in level
        for t in GRAPH[m]
        if t.split(".")[0] in ("mugv", "converters") and (t not in level or level[t] <= level[m])
    )
    assert not bad, "imports that climb back up (or sideways) along the convert path:\n  " + "\n  ".join(bad)
