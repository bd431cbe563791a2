"""Project scripts, run as modules from the repository root (``python -m scripts.<folder>.<name>``).

- ``scripts.tables``: the generators behind every README results table (``make tables``);
- ``scripts.bench``: kernel and quantization timing;
- ``scripts.diagnostics``: the one-off studies the README cites;
- ``scripts/dev``: build checks (shell).

Everything they write goes to ``results/`` at the repository root.
"""
