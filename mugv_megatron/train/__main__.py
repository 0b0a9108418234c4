"""`python -m mugv_megatron.train`: the command line of mugv_megatron.train.backend (flags below; the module docstring
there has the rest).
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
    overrides = {
        "tp": FLAGS.tp,
        "pp": FLAGS.pp,
        "cp": FLAGS.cp,
        "sp": FLAGS.sp,
        "distributed_optimizer": FLAGS.distributed_optimizer,
    }
    if FLAGS.verify_data:
        FLAGS.config.data.verify = True
    run = as_run_config(FLAGS.config)  # validated before torch loads: errors name the flag
    import torch.distributed as dist

    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train.backend import train, with_overrides

    run = with_overrides(run, overrides)
    setup_logging(verbosity_flag())  # third-party INFO (orbax, absl) only with --verbosity
    summary = train(run, FLAGS.workdir)
    if dist.get_rank() == 0:
        print(
            f"finished at step {summary['step']} ({summary['stopped_by']}); last loss {summary['loss']}; "
            f"skipped steps {summary['skipped']}; workdir {FLAGS.workdir}"
        )
    parallel.teardown()


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, logs and config.json go here")
    flags.DEFINE_integer("tp", None, "tensor-parallel size (overrides config.megatron.tp)")
    flags.DEFINE_integer("pp", None, "pipeline-parallel size (overrides config.megatron.pp; must divide the depth)")
    flags.DEFINE_integer("cp", None, "context-parallel size (overrides config.megatron.cp)")
    flags.DEFINE_bool("sp", None, "sequence parallel (overrides config.megatron.sp)")
    flags.DEFINE_bool(
        "distributed_optimizer",
        None,
        "megatron DistributedOptimizer on CUDA "
        "(overrides config.megatron.distributed_optimizer; torch AdamW otherwise)",
    )
    flags.DEFINE_bool(
        "verify_data", False, "check every shard byte against the dataset's recorded CRCs at open (config.data.verify)"
    )
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from mugv.run.cli import run_app

    _define_flags()
    run_app(main)
