"""``python -m grapheme``: the ``grapheme`` command, where its console
script is not on the PATH (an in-place build, a venv not activated)."""
import os
import sys

from .cli import run

if __name__ == "__main__":
    # named as it was started (python3 -m grapheme), for the usage lines and
    # the command that resumes an interrupted run
    sys.exit(run(prog=f"{os.path.basename(sys.executable) or 'python'} -m grapheme"))
