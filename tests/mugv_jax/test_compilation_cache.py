"""Where mugv_jax.compilation_cache.setup puts JAX's persistent compilation cache, and that a
fresh in-memory state then compiles from it. (The trainer's second start reading the cache its
first start wrote: tests/mugv_jax/test_train_loop.py, the SIGKILL-and-resume test.)"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cc

from mugv_jax import compilation_cache as cc


@pytest.fixture
def jax_cache_config(monkeypatch):
    """Restores JAX's cache settings (the suite's shared cache) after the test."""
    monkeypatch.delenv(cc.ENV, raising=False)
    keep = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_enable_compilation_cache")}
    yield
    jax_cc.reset_cache()
    for k, v in keep.items():
        jax.config.update(k, v)


def test_precedence_flag_env_jax_default(tmp_path, monkeypatch, jax_cache_config):
    jax.config.update("jax_compilation_cache_dir", None)
    assert cc.setup(str(tmp_path / "default")) == str(tmp_path / "default")
    # JAX's own setting (here the one just made) is kept over a caller's default...
    assert cc.setup(str(tmp_path / "other")) == str(tmp_path / "default")
    # ...the environment variable wins over it, and a flag over the environment.
    monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
    assert cc.setup(str(tmp_path / "other")) == str(tmp_path / "env")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    assert cc.setup(None, override=str(tmp_path / "flag")) == str(tmp_path / "flag")
    for off in ("off", "OFF", "0"):
        monkeypatch.setenv(cc.ENV, off)
        assert cc.setup(str(tmp_path / "default")) is None
        assert not jax.config.jax_enable_compilation_cache
    monkeypatch.delenv(cc.ENV)
    assert cc.setup(None, override="off") is None
    assert cc.setup(str(tmp_path / "x"), override=str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert jax.config.jax_enable_compilation_cache


def test_a_fresh_process_state_compiles_from_the_directory(tmp_path, monkeypatch, jax_cache_config):
    """After the in-memory caches are dropped (what a restart does), the same function is read
    from the directory setup chose: counted through JAX's monitoring events."""
    from jax._src import monitoring

    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # a tiny function is cached too
    events = []
    listener = lambda name, **kw: events.append(name)
    monitoring.register_event_listener(listener)
    try:
        path = cc.setup(None, override=str(tmp_path / "cache"))
        x = jnp.ones(7)
        f = lambda x: jnp.sin(x) * 3.0 + jnp.arange(7.0)
        count = lambda: tuple(events.count(f"/jax/compilation_cache/cache_{k}") for k in ("hits", "misses"))
        before = count()
        jax.jit(f).lower(x).compile()
        assert count() == (before[0], before[1] + 1)
        assert list((tmp_path / "cache").iterdir()), "nothing was written to the cache"
        jax.clear_caches()
        jax.jit(f).lower(x).compile()
        assert count() == (before[0] + 1, before[1] + 1)  # read back, not compiled again
        assert path == str(tmp_path / "cache")
    finally:
        monitoring.unregister_event_listener(listener)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
