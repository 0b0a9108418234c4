"""Test set-up: 8 fake CPU devices for JAX (must happen before jax is imported anywhere), and a
persistent compilation cache shared by the test process and the training subprocesses it starts,
so the same train step is compiled once per suite run rather than once per process."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mugv-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


# Longest files first. The suite runs in two pytest-xdist workers, one file at a time each
# (--dist=loadfile, so a file's module fixtures are built once); handing out the longest files
# first keeps a long file from starting last while the other worker idles (the greedy
# longest-processing-time order). Seconds per file of one suite run on the 2-core VM with other
# jobs beside it (2026-12-07, load ≈ 12: only the order matters), from scripts/file_seconds.py;
# a file not listed keeps its place after the listed ones. scripts/test.sh passes
# --no-loadscope-reorder so that xdist keeps this order.
FILE_SECONDS = {
    "tests/main_job/test_main_job.py": 369,
    "tests/mugv_jax/test_plan.py": 216,
    "tests/mugv_jax/test_train_loop.py": 202,
    "tests/cross_backend/test_recipe_parity.py": 138,
    "tests/mugv_jax/test_vae_training.py": 132,
    "tests/mugv_jax/test_trainer.py": 131,
    "tests/cross_backend/test_stage_configs_both_backends.py": 114,
    "tests/mugv_jax/test_context_parallel.py": 100,
    "tests/mugv_jax/test_vae_golden.py": 96,
    "tests/bench/test_device_check.py": 95,
    "tests/cross_backend/test_release_finetune_journey.py": 88,
    "tests/cross_backend/test_fault_campaign.py": 64,
    "tests/mugv_jax/test_multihost.py": 61,
}


def pytest_collection_modifyitems(config, items):
    def weight(item):
        return -FILE_SECONDS.get(item.nodeid.split("::")[0], 0.0)

    items.sort(key=weight)  # stable: tests keep their order within a file
