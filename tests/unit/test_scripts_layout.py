"""scripts/ and results/ as the README describes them: every script runs as a module from the
repository root (``python -m scripts.<folder>.<name>``) without ``sys.path`` tricks, every command
the README and the Makefile print names a script that exists, and every ``results/`` file the
README cites is there (superseded runs live in ``results/archive/``, indexed in its README).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "Makefile", "kernels_cuda/README.md")
FOLDERS = ("tables", "bench", "diagnostics")


def _modules() -> list[str]:
    return sorted(
        f"scripts.{p.parent.name}.{p.stem}"
        for folder in FOLDERS
        for p in (REPO / "scripts" / folder).glob("*.py")
        if p.name != "__init__.py"
    )


def test_scripts_are_packages_without_sys_path_tricks():
    assert (REPO / "scripts" / "__init__.py").is_file()
    for folder in FOLDERS:
        assert (REPO / "scripts" / folder / "__init__.py").is_file(), folder
    assert [p.name for p in (REPO / "scripts").glob("*.py")] == ["__init__.py"], "scripts in folders"
    for path in (REPO / "scripts").rglob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path}: import through scripts.<folder>.<module>"
    assert (REPO / "scripts" / "dev" / "check_cuda_build.sh").is_file()


def test_every_script_imports_and_starts():
    """One interpreter at the repository root: import every script module, then run each one
    that has a main guard with ``--help`` (exit 0), and check the command a table records."""
    mods = _modules()
    assert "scripts.tables.common" in mods and len(mods) >= 13
    program = f"""
import contextlib, importlib, importlib.machinery, importlib.util, io, runpy, sys, warnings
warnings.simplefilter("ignore", RuntimeWarning)
mods = {mods!r}
for m in mods:
    importlib.import_module(m)
started = 0
for m in mods:
    if "if __name__ == '__main__':" not in open(importlib.util.find_spec(m).origin).read().replace('"', "'"):
        continue
    sys.argv = [m, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_module(m, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code == 0 and "usage:" in out.getvalue(), (m, exc.code)
        started += 1
    else:
        raise AssertionError(m + " --help did not exit")
from scripts.tables.common import RESULTS, command
sys.modules["__main__"].__spec__ = importlib.machinery.ModuleSpec("scripts.tables.table_foundation", None)
sys.argv = ["table_foundation.py", "--limit", "16"]
assert command() == "python -m scripts.tables.table_foundation --limit 16", command()
assert RESULTS == importlib.import_module("pathlib").Path({str(REPO)!r}) / "results", RESULTS
print("ok", started)
"""
    res = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr
    assert int(res.stdout.split()[1]) == len(mods) - 2  # all but common.py and bisup_diag.py


def test_documented_commands_name_existing_scripts():
    """``python -m scripts.x.y`` / ``scripts/...`` in the README, the Makefile and the kernels'
    README: each names a file that exists (the old flat ``python scripts/x.py`` form is gone)."""
    seen = 0
    for doc in DOCS:
        text = (REPO / doc).read_text()
        assert not re.search(r"python3? scripts/\w+\.py", text), (
            f"{doc}: use python -m scripts.<folder>.<name>"
        )
        for mod in re.findall(r"-m (scripts(?:\.\w+)+)", text):
            assert (REPO / (mod.replace(".", "/") + ".py")).is_file(), f"{doc}: {mod}"
            seen += 1
        for path in re.findall(r"\bscripts/[\w/]+\.(?:py|sh)\b", text):
            assert (REPO / path).is_file(), f"{doc}: {path}"
    assert seen >= 8
    tables = (REPO / "Makefile").read_text().split("\ntables:", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"-m (scripts\.tables\.\w+)", tables) == [
        "scripts.tables.table_foundation",
        "scripts.tables.table_rotation",
        "scripts.tables.table_kv_methods",
        "scripts.tables.table_lowrank_bisup",
    ]


def test_results_the_readme_cites_exist_and_the_archive_is_indexed():
    readme = (REPO / "README.md").read_text()
    cited = set(re.findall(r"\bresults/[\w.*-]+\.(?:json|md)", readme))
    assert cited
    for ref in cited:
        assert list(REPO.glob(ref)), f"README cites {ref}, not in results/"
    archive = REPO / "results" / "archive"
    index = (archive / "README.md").read_text()
    for f in archive.iterdir():
        if f.name != "README.md":
            assert f"`{f.name}`" in index, f"results/archive/README.md does not describe {f.name}"
            assert not (REPO / "results" / f.name).exists(), f"{f.name} is both archived and current"
