"""JAX's persistent compilation cache, on by default for the trainers and the samplers.

A restart (a resume after preemption, a second sampling call) then loads its compiled steps from
disk instead of compiling them again: the tiny train step takes ~13 s to compile cold and ~2 s
from the cache on a 2-core CPU (docs/benchmarks.md); a 10B step on a pod, minutes.

Where the cache lives, first match wins:
1. A command-line flag where there is one (`python -m mugv_jax.sample --compilation_cache=…`),
   then `MUGV_COMPILATION_CACHE`: a directory (local or remote, such as gs://…), or `off`.
2. JAX's own setting, when made (`JAX_COMPILATION_CACHE_DIR` or `jax.config`): left as it is.
3. The caller's default: `<workdir>/jax_cache` for the trainers, so the hosts of a pod whose
   workdir is shared (a bucket, NFS) share it; `user_cache_dir()` for the command-line samplers.
JAX writes entries from process 0 only and every host reads them.
"""

from __future__ import annotations

import logging
import os

import jax

ENV = "MUGV_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false")
WORKDIR_SUBDIR = "jax_cache"

log = logging.getLogger("mugv.compilation_cache")


def user_cache_dir() -> str:
    """$XDG_CACHE_HOME/mugv/jax (default ~/.cache/mugv/jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mugv", "jax")


def workdir_cache_dir(workdir: str) -> str:
    return os.path.join(os.fspath(workdir), WORKDIR_SUBDIR)


def setup(default_dir: str | None, override: str | None = None) -> str | None:
    """Turn the persistent cache on (see the module docstring); returns its directory, or None
    when it is off. `override`: a flag's value (a directory or `off`). Call once at start-up,
    before the first compile."""
    choice = (override or os.environ.get(ENV, "")).strip()
    if choice.lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache off (%s)", choice)
        return None
    current = jax.config.jax_compilation_cache_dir
    if choice:
        path = choice
    elif current:
        path = current
    elif default_dir:
        path = os.fspath(default_dir)
    else:
        return None
    if path != current:
        from jax.experimental.compilation_cache import compilation_cache

        # A cache JAX already opened at the old directory would keep being used.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_enable_compilation_cache", True)
    log.info("persistent compilation cache: %s (%s=off to disable)", path, ENV)
    return path
