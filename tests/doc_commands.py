"""The shell commands the docs show, as tests run them (Rust's doc tests are the model).

Commands come from the fenced shell blocks of README.md and docs/*.md (tagged bash/sh/shell/
console or untagged) and from the usage lines of the launch scripts' header comments. A
`# illustrative: <why>` line marks the commands after it (to the end of its block or header) as
not run by any test. tests/core/test_docs_commands.py requires every other command to be taken
by a test through `doc_command`, so what the doc says is what executes.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_TAGS = {"", "bash", "sh", "shell", "console"}
ILLUSTRATIVE = "# illustrative:"
_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository root
    line: int  # 1-based line of the command's first line
    text: str  # continuations joined, prompt stripped
    illustrative: str | None  # the reason, when marked

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    launch = sorted([*(root / "launch").glob("*.sh"), *(root / "launch").glob("*.sbatch")])
    return [p for p in docs + launch if p.is_file()]


def _commands(rel: str, lines: list[tuple[int, str]]) -> list[DocCommand]:
    """Commands of one block or header: `\\` continuations and option synopses (`[--x]` lines)
    joined to their command; comment lines skipped; in a block with `$ ` prompts (console), the
    other lines are output."""
    out: list[DocCommand] = []
    console = any(raw.strip().startswith("$ ") for _, raw in lines)
    reason: str | None = None
    pending: list[str] = []
    start = 0
    for number, raw in lines:
        text = raw.strip()
        if not pending:
            if text.startswith("[-") and out:
                pending = [out.pop().text]  # a synopsis line of options continues the command
            elif not text or (console and not text.startswith(("$ ", "#"))):
                continue
            elif text.startswith("#"):
                if text.lower().startswith(ILLUSTRATIVE):
                    reason = text[len(ILLUSTRATIVE) :].strip()
                    if not reason:
                        raise ValueError(f"{rel}:{number}: '{ILLUSTRATIVE}' needs a reason")
                continue
            else:
                text = text[2:].strip() if text.startswith("$ ") else text
                start = number
        pending.append(text[:-1].rstrip() if text.endswith("\\") else text)
        if not text.endswith("\\"):
            out.append(DocCommand(rel, start, " ".join(p for p in pending if p), reason))
            pending = []
    if pending:
        out.append(DocCommand(rel, start, " ".join(p for p in pending if p), reason))
    return out


def _markdown_blocks(lines: list[str]) -> list[list[tuple[int, str]]]:
    """Lines of each fenced shell block (other languages are skipped)."""
    blocks: list[list[tuple[int, str]]] = []
    fence, current = None, None
    for i, line in enumerate(lines, 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                current = [] if m.group(2).lower() in SHELL_TAGS else None
            continue
        if m and not m.group(2) and line.strip().startswith(fence):
            if current is not None:
                blocks.append(current)
            fence, current = None, None
        elif current is not None:
            current.append((i, line))
    return blocks


def _header_usage(lines: list[str]) -> list[tuple[int, str]]:
    """The indented lines (`#   cmd`) of the leading comment block, comment markers stripped."""
    usage: list[tuple[int, str]] = []
    for i, line in enumerate(lines, 1):
        if i == 1 and line.startswith("#!"):
            continue
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        body = line[1:]
        if body.lower().lstrip().startswith(ILLUSTRATIVE[2:]):
            usage.append((i, "# " + body.strip()))
        elif body.startswith("   ") and body.strip():
            usage.append((i, body))
        else:
            usage.append((i, ""))  # prose ends a command
    return usage


def extract(path: Path, root: Path = ROOT) -> list[DocCommand]:
    rel = path.relative_to(root).as_posix()
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        return [c for block in _markdown_blocks(lines) for c in _commands(rel, block)]
    return _commands(rel, _header_usage(lines))


def all_commands(root: Path = ROOT) -> list[DocCommand]:
    return [c for p in doc_files(root) for c in extract(p, root)]


def find(file: str, prefix: str, root: Path = ROOT) -> DocCommand:
    """The one command of `file` that starts with `prefix`."""
    hits = [c for c in extract(root / file, root) if c.text.startswith(prefix)]
    if len(hits) != 1:
        found = "\n  ".join(f"{c.where()}: {c.text}" for c in hits) or "none"
        raise LookupError(f"{file}: want one documented command starting {prefix!r}, found:\n  {found}")
    return hits[0]


def doc_command(file: str, prefix: str, subs: dict[str, str] | None = None, root: Path = ROOT) -> list[str]:
    """The documented command as argv: each `subs` key (a literal the doc must contain) replaced,
    then the synopsis's optional `[...]` words left out and a trailing `# comment` dropped.

    A substitution the command does not contain is an error: the doc changed under the test.
    """
    text = find(file, prefix, root).text
    for old, new in (subs or {}).items():
        if old not in text:
            raise LookupError(f"{file}: {prefix!r}: the documented command has no {old!r} to substitute: {text}")
        text = text.replace(old, new)
    return shlex.split(_OPTIONAL.sub("", text), comments=True)


# `[--flag=V ...]`, `[--negative[="..."]]`, `[PROJECT=p]` as whole words (not `tiny.py[:final]`).
_OPTIONAL = re.compile(r"(?:^|\s)\[(?:[^\[\]]|\[[^\[\]]*\])*\](?=\s|$)")


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading `NAME=value` words (the command's environment) and the rest."""
    env: dict[str, str] = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, value = argv[0].split("=", 1)
        env[name] = value
        argv = argv[1:]
    return env, argv


_CALL = re.compile(r"""doc_command\(\s*(["'])(.+?)\1\s*,\s*(["'])(.+?)\3""", re.S)


def covering_calls(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(file, prefix) of every `doc_command(FILE, PREFIX, …)` call with string literals under root/tests → the
    test files that make it."""
    calls: dict[tuple[str, str], list[str]] = {}
    for path in sorted((root / "tests").rglob("*.py")):
        for m in _CALL.finditer(path.read_text()):
            key = (
                ast.literal_eval(m.group(1) + m.group(2) + m.group(1)),
                ast.literal_eval(m.group(3) + m.group(4) + m.group(3)),
            )
            calls.setdefault(key, []).append(path.relative_to(root).as_posix())
    return calls


def uncovered(root: Path = ROOT) -> list[DocCommand]:
    """Documented commands neither marked illustrative nor taken by a test."""
    calls = covering_calls(root)
    return [
        c
        for c in all_commands(root)
        if c.illustrative is None and not any(f == c.file and c.text.startswith(p) for f, p in calls)
    ]


def ambiguous_calls(root: Path = ROOT, skip: tuple[str, ...] = ()) -> list[str]:
    """Literal calls (outside the test files in `skip`) whose prefix does not name exactly one
    command of their file, as 'test files: file prefix (n commands)': a doc edited under a test."""
    texts: dict[str, list[str]] = {}
    for c in all_commands(root):
        texts.setdefault(c.file, []).append(c.text)
    bad = []
    for (file, prefix), tests in covering_calls(root).items():
        tests = [t for t in tests if t not in skip]
        n = sum(t.startswith(prefix) for t in texts.get(file, []))
        if tests and n != 1:
            bad.append(f"{', '.join(tests)}: {file} {prefix!r} ({n} commands)")
    return bad
