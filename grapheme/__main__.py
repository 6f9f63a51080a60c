"""``python -m grapheme``: the ``grapheme`` command, where its console
script is not on the PATH (an in-place build, a venv not activated)."""
import shlex
import sys

from .cli import run

if __name__ == "__main__":
    # named as it was started, for the usage lines and the command that
    # resumes an interrupted run: this Python by its path, as "python" on
    # the PATH may be another, without grapheme (a venv not activated)
    sys.exit(run(prog=f"{shlex.quote(sys.executable or 'python')} -m grapheme"))
