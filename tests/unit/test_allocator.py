"""qtool's allocator settings (qtool/allocator.py): when the entry point re-executes, and that it does."""

import json
import os
import subprocess
import sys

import pytest

from qtool.allocator import OPT_OUT, TUNABLES, huge_pages_available, tuned_env


@pytest.mark.parametrize(
    "text,expected",
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ],
)
def test_huge_pages_available_reads_the_selected_mode(tmp_path, text, expected):
    f = tmp_path / "enabled"
    f.write_text(text)
    assert huge_pages_available(str(f)) is expected
    assert huge_pages_available(str(tmp_path / "missing")) is False


def test_tuned_env_sets_the_tunables_and_keeps_the_rest():
    env = tuned_env({"PATH": "/bin"}, thp=True, libc="glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLES}
    other = tuned_env({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, thp=True, libc="glibc")
    assert other["GLIBC_TUNABLES"] == f"glibc.rtld.optional_static_tls=512:{TUNABLES}"


@pytest.mark.parametrize(
    "environ,thp,libc",
    [
        ({OPT_OUT: "default"}, True, "glibc"),  # the user's opt-out
        (
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
            True,
            "glibc",
        ),  # the user's own malloc settings
        ({"GLIBC_TUNABLES": TUNABLES}, True, "glibc"),  # after the exec: never twice
        ({}, False, "glibc"),  # no transparent huge pages: 4 KiB faults for every temporary
        ({}, True, ""),  # not glibc (musl, ...)
    ],
)
def test_tuned_env_leaves_the_process_alone(environ, thp, libc):
    assert tuned_env(environ, thp=thp, libc=libc) is None


def _versions(env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "qtool", "--version"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_entry_point_runs_with_the_tunables_it_sets():
    """`python -m qtool` re-executes itself once with the tunables (where the system allows them) and
    reports them in --version; with the opt-out, or the user's own settings, it runs as started."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    expected = tuned_env(base)
    got = _versions(base)
    if expected is None:
        assert "glibc_tunables" not in got
    else:
        assert got["glibc_tunables"] == TUNABLES
    assert "glibc_tunables" not in _versions({**base, OPT_OUT: "default"})
    own = "glibc.malloc.trim_threshold=1048576"
    assert _versions({**base, "GLIBC_TUNABLES": own})["glibc_tunables"] == own
