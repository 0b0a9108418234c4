"""Command lines that take `--config=FILE[:ARG]` and `--config.a.b=value` (absl + ml_collections):
short errors instead of tracebacks.

ml_collections refuses an override of a field the config does not have by raising from inside
absl's flag parsing (a 55-line traceback ending in `AttributeError: "'learnig_rate'"`); a run
config that does not validate raises from inside `main`. `run_app(main)` turns both into one
line naming the flag and, for a typo, the nearest field:

    error: --config.optim.learnig_rate: no such field; did you mean --config.optim.learning_rate?
"""

from __future__ import annotations

import re
import sys

from mugv.run.typed import ConfigError, unknown_field

EXIT_USAGE = 2


def _config_argument(argv: list[str], flag_values, name: str) -> str | None:
    """The `--config=FILE[:ARG]` argument (or the flag's default)."""
    for i, a in enumerate(argv[1:], 1):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    default = flag_values[name].default
    return default if isinstance(default, str) else None


def _override_paths(argv: list[str], name: str) -> list[str]:
    """The dotted paths of every `--config.a.b[=value]` / `--noconfig.a.b` on the command line."""
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    return [m.group(1) for a in argv[1:] if (m := pattern.match(a))]


def _mapping_keys(node):
    keys = getattr(node, "keys", None)
    return list(keys()) if callable(keys) else None


def explain_override_error(argv: list[str], flag_values, name: str = "config") -> str | None:
    """The first `--config.` override naming a field the config file does not have, as one line
    with the nearest field; None when every override names a field (the error was another)."""
    if name not in flag_values:
        return None
    argument = _config_argument(argv, flag_values, name)
    if argument is None:
        return None
    try:
        config = flag_values[name].parser.parse(argument)
    except ValueError as e:  # the config file refused its argument: say that
        return f"--{name}={argument}: {e}"
    for path in _override_paths(argv, name):
        node, walked = config, []
        for key in path.split("."):
            keys = _mapping_keys(node)
            if keys is None:
                return f"--{name}.{path}: config.{'.'.join(walked)} is a value, not a section"
            if key not in keys:
                return str(unknown_field(".".join(walked), key, keys)).replace("--config.", f"--{name}.")
            node, walked = node[key], [*walked, key]
    return None


def parse_flags(argv: list[str], flag_values=None, name: str = "config") -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad flag or override
    exits with one line on stderr."""
    from absl import flags

    flag_values = flag_values if flag_values is not None else flags.FLAGS
    try:
        return flag_values(argv)
    except flags.Error as e:
        message = explain_override_error(argv, flag_values, name) or str(e)
    except Exception:  # ml_collections raises AttributeError/KeyError for a missing field
        message = explain_override_error(argv, flag_values, name)
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run_app(main) -> None:
    """`absl.app.run(main)` with short errors for bad flags and for a run config that does not
    validate (ConfigError)."""
    from absl import app

    def guarded(argv):
        try:
            return main(argv)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    app.run(guarded, flags_parser=parse_flags)
