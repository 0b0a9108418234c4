"""`python -m mugv_jax.sample`: see mugv_jax/sample/cli.py for the flags."""

from absl import app

from mugv_jax.sample.cli import main

if __name__ == "__main__":
    app.run(main)
