"""``python -m qtool``: the command line (also what torchrun launches)."""

from qtool.cli import app

if __name__ == "__main__":
    app()
