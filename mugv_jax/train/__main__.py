"""`python -m mugv_jax.train`: the command line of mugv_jax.train.backend (flags below; the module docstring there has
the rest).
"""

from __future__ import annotations

# Before anything heavy is imported: a SIGTERM during start-up is a request to stop, not a crash.
from mugv.run import preemption

preemption.install()

from mugv.run.console import setup_logging, verbosity_flag  # noqa: E402


def main(argv):
    from absl import flags

    from mugv.run.config import as_run_config

    FLAGS = flags.FLAGS
    if FLAGS.verify_data:
        FLAGS.config.data.verify = True
    run = as_run_config(FLAGS.config)  # validated before anything is built: errors name the flag
    from mugv_jax.train.backend import train

    if FLAGS.distributed or FLAGS.coordinator_address:
        from mugv_jax.parallel import distributed

        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    setup_logging(verbosity_flag())  # third-party INFO (orbax, absl) only with --verbosity
    summary = train(run, FLAGS.workdir)
    print(
        f"finished at step {summary['step']} ({summary['stopped_by']}); last loss {summary['loss']}; "
        f"skipped steps {summary['skipped']}; workdir {FLAGS.workdir}"
    )


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, logs and samples go here")
    flags.DEFINE_bool(
        "distributed",
        False,
        "multi-host: call jax.distributed.initialize(); with no "
        "other flag JAX detects the cluster (TPU pod, Slurm srun)",
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "multi-host: host:port of process 0 (or MUGV_COORDINATOR_ADDRESS); implies --distributed",
    )
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes (or MUGV_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index (or MUGV_PROCESS_ID)")
    flags.DEFINE_bool(
        "verify_data", False, "check every shard byte against the dataset's recorded CRCs at open (config.data.verify)"
    )
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from mugv.run.cli import run_app

    _define_flags()
    run_app(main)
