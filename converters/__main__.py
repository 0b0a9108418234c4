"""`python -m converters`: see converters/cli.py."""

import sys

from converters.cli import main

# dist_checkpointing starts helper processes with "spawn", which re-imports this module: the
# guard keeps them from running the CLI again.
if __name__ == "__main__":
    sys.exit(main())
