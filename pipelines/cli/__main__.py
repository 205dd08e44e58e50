"""``python -m pipelines.cli``: the ``maxa`` command line without the console script."""

import sys

from pipelines.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
