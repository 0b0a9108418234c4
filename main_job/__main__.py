"""The main job: `python -m main_job --workdir=outputs/main [--quick] [--redo=dit,sample]`.

Bundled data → small VAE → latent shards → small MUG-DiT with the real trainer → held-out
text-to-video and image-to-video samples decoded to mp4 → <workdir>/report.html. Finished stages
are reused by the next run (stages: data, vae, encode, dit, sample; redoing one redoes every later
one); an interrupted run resumes. See docs/main_job.md; the stages are main_job/run.py.

    --config=configs/main.py (full, default) | configs/main.py:quick; fields override as usual,
    e.g. --config.dit.num_steps=2000.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from main_job import run as main_run
from mugv.run.cli import run_app

_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "main.py")
FLAGS = flags.FLAGS


def _define_flags():
    config_flags.DEFINE_config_file(
        "config", None, "main-job config (configs/main.py[:quick]; default configs/main.py)", lock_config=True
    )
    flags.DEFINE_string("workdir", "outputs/main", "work directory: stages, checkpoints, report.html")
    flags.DEFINE_bool("quick", False, "the shortened version: same as --config=configs/main.py:quick")
    flags.DEFINE_list("redo", [], "stages to run again even if done: data,vae,encode,dit,sample")


def main(argv):
    del argv
    from mugv.run.console import setup_logging, verbosity_flag

    # Orbax and XLA log every checkpoint step at INFO; the stage log and progress bars are enough.
    setup_logging(verbosity_flag())
    try:
        main_run.run(FLAGS.config, FLAGS.workdir, FLAGS.redo)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished stages and the trainers' checkpoints in {FLAGS.workdir} are kept; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(130)


def _argv(argv: list[str]) -> list[str]:
    """The config file named on the command line before flag parsing (configs/main.py, or its
    `:quick` variant for `--quick`), so --config.* overrides apply to it and are parsed with the
    other flags."""
    given = any(a == "--config" or a.startswith("--config=") for a in argv)
    if "--quick" in argv and given:
        raise SystemExit("--quick selects --config=configs/main.py:quick; pass one or the other")
    if given:
        return argv
    variant = ":quick" if "--quick" in argv else ""
    return [argv[0], f"--config={os.path.abspath(_CONFIG)}{variant}", *argv[1:]]


if __name__ == "__main__":
    sys.argv = _argv(sys.argv)
    _define_flags()
    run_app(main)
