"""The shell commands the docs show, as tests run them (Rust's doc tests are the model).

Commands come from the fenced shell blocks of README.md and docs/*.md (tagged bash/sh/shell/
console or untagged) and from the usage lines of the launch scripts' header comments. A
`# illustrative: <why>` line marks the commands after it (to the end of its block or header) as
not run by any test. tests/project/test_docs_commands.py requires every other command to be taken
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
    block: str | None = None  # NAME of a block after `<!-- commands: NAME -->`, run whole by doc_block

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    launch = sorted([*(root / "launch").glob("*.sh"), *(root / "launch").glob("*.sbatch")])
    return [p for p in docs + launch if p.is_file()]


def _commands(rel: str, lines: list[tuple[int, str]], block: str | None = None) -> list[DocCommand]:
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
            out.append(DocCommand(rel, start, " ".join(p for p in pending if p), reason, block))
            pending = []
    if pending:
        out.append(DocCommand(rel, start, " ".join(p for p in pending if p), reason, block))
    return out


def _markdown_blocks(lines: list[str]) -> list[tuple[str | None, list[tuple[int, str]]]]:
    """(name, lines) of each fenced shell block (other languages are skipped); the name is NAME
    when the line before the fence is `<!-- commands: NAME -->`."""
    blocks: list[tuple[str | None, list[tuple[int, str]]]] = []
    fence, current, name = None, None, None
    for i, line in enumerate(lines, 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                current = [] if m.group(2).lower() in SHELL_TAGS else None
                named = _NAMED.match(lines[i - 2]) if i > 1 else None
                name = named.group(1) if named else None
            continue
        if m and not m.group(2) and line.strip().startswith(fence):
            if current is not None:
                blocks.append((name, current))
            fence, current = None, None
        elif current is not None:
            current.append((i, line))
    return blocks


_NAMED = re.compile(r"^\s*<!--\s*commands:\s*(\S+)\s*-->")


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
        return [c for name, block in _markdown_blocks(lines) for c in _commands(rel, block, name)]
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
    for old in subs or {}:
        if old not in text:
            raise LookupError(f"{file}: {prefix!r}: the documented command has no {old!r} to substitute: {text}")
    return _argv(text, subs)


def doc_block(file: str, name: str, subs: dict[str, str] | None = None, root: Path = ROOT) -> list[list[str]]:
    """Every command of the block after `<!-- commands: NAME -->` in `file`, as doc_command gives
    them; each `subs` key must occur in at least one of them."""
    texts = [c.text for c in extract(root / file, root) if c.block == name]
    if not texts:
        raise LookupError(f"{file}: no shell block after '<!-- commands: {name} -->'")
    for old in subs or {}:
        if not any(old in t for t in texts):
            raise LookupError(f"{file}: block {name!r} has no {old!r} to substitute")
    return [_argv(t, subs) for t in texts]


def _argv(text: str, subs: dict[str, str] | None) -> list[str]:
    if subs:  # all at once, longest first: a replacement is never substituted again
        keys = sorted(subs, key=len, reverse=True)
        text = re.sub("|".join(map(re.escape, keys)), lambda m: subs[m.group(0)], text)
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


_CALL = re.compile(r"""doc_(command|block)\(\s*(["'])(.+?)\2\s*,\s*(["'])(.+?)\4""", re.S)


def covering_calls(root: Path = ROOT) -> dict[tuple[str, str, str], list[str]]:
    """(kind, file, prefix or block name) of every `doc_command(FILE, PREFIX, …)` or
    `doc_block(FILE, NAME, …)` call with string literals under root/tests → the test files making it."""
    calls: dict[tuple[str, str, str], list[str]] = {}
    for path in sorted((root / "tests").rglob("*.py")):
        for m in _CALL.finditer(path.read_text()):
            file = ast.literal_eval(m.group(2) + m.group(3) + m.group(2))
            key = (m.group(1), file, ast.literal_eval(m.group(4) + m.group(5) + m.group(4)))
            calls.setdefault(key, []).append(path.relative_to(root).as_posix())
    return calls


def _covers(kind: str, file: str, arg: str, c: DocCommand) -> bool:
    return file == c.file and (c.text.startswith(arg) if kind == "command" else c.block == arg)


def uncovered(root: Path = ROOT) -> list[DocCommand]:
    """Documented commands neither marked illustrative nor taken by a test."""
    calls = covering_calls(root)
    return [c for c in all_commands(root) if c.illustrative is None and not any(_covers(*k, c) for k in calls)]


def ambiguous_calls(root: Path = ROOT, skip: tuple[str, ...] = ()) -> list[str]:
    """Literal calls (outside the test files in `skip`) that do not name exactly one command (a
    doc_block: at least one), as 'test files: file prefix (n commands)': a doc edited under a test."""
    commands = all_commands(root)
    bad = []
    for (kind, file, arg), tests in covering_calls(root).items():
        tests = [t for t in tests if t not in skip]
        n = sum(_covers(kind, file, arg, c) for c in commands)
        if tests and (n != 1 if kind == "command" else n == 0):
            bad.append(f"{', '.join(tests)}: {file} {arg!r} ({n} commands)")
    return bad
