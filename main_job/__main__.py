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

from absl import app, flags
from ml_collections import config_flags

from main_job import run as main_run

_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "main.py")
config_flags.DEFINE_config_file("config", _CONFIG, "main-job config (configs/main.py[:quick])", lock_config=True)
flags.DEFINE_string("workdir", "outputs/main", "work directory: stages, checkpoints, report.html")
flags.DEFINE_bool("quick", False, "the shortened version: same as --config=configs/main.py:quick")
flags.DEFINE_list("redo", [], "stages to run again even if done: data,vae,encode,dit,sample")
FLAGS = flags.FLAGS


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
    """`--quick` selects configs/main.py:quick before flag parsing, so --config.* overrides apply
    to it."""
    if "--quick" not in argv:
        return argv
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        raise SystemExit("--quick selects --config=configs/main.py:quick; pass one or the other")
    return [argv[0], f"--config={os.path.abspath(_CONFIG)}:quick", *argv[1:]]


if __name__ == "__main__":
    app.run(main, argv=_argv(sys.argv))
