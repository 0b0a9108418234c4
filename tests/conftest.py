"""Test set-up: 8 fake CPU devices for JAX (must happen before jax is imported anywhere), and a
persistent compilation cache shared by the test process and the training subprocesses it starts,
so the same train step is compiled once per suite run rather than once per process."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mugv-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
