"""``python -m grapheme``: the ``grapheme`` command, where its console
script is not on the PATH (an in-place build, a venv not activated)."""
import sys

from .cli import run

if __name__ == "__main__":
    sys.exit(run())
