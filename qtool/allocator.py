"""How qtool sets up glibc's allocator for its own process (Linux).

Layer-by-layer calibration allocates and frees activation temporaries of 9-24 MiB for every batch
(a SmolLM2 down_proj input of 8 x 512 x 1536 float32 is 24 MiB). glibc serves requests below its mmap
threshold from the heap, and that threshold climbs by itself to 32 MiB once a large block is freed,
so these temporaries end up in the heap, at addresses that depend on everything allocated before.
In some runs every batch reuses the same addresses; in others each batch touches pages the last
one did not, and the resident size climbs through a stage. Measured on the W4A4 rotate + GPTQ
side-by-side recipe (SmolLM2, 64 x 512, one thread, the same code and inputs): peaks of 1.49 to
1.68 GiB from run to run.

With ``glibc.malloc.mmap_threshold`` fixed at 4 MiB every such temporary is a mapping of its own,
returned to the system when freed, so a stage's resident size is its live tensors; with
``glibc.malloc.hugetlb=1`` those mappings are made of transparent huge pages, so faulting them in
costs one fault per 2 MiB instead of one per 4 KiB page (without huge pages the same threshold cost
45% more time on that recipe; with them about 5%). Measured: peaks 1.43-1.47 GiB over five runs.

glibc reads its tunables once, when a process starts: the command-line entry point re-executes
itself once with them set (:func:`reexec_tuned`). Nothing changes where the user already set any
``glibc.malloc`` tunable, where the system has no transparent huge pages, outside glibc/Linux, or
with ``QTOOL_MALLOC=default``. Values computed do not depend on any of this.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"
OPT_OUT = "QTOOL_MALLOC"  # "default": leave the allocator as it is
THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available(path: str = THP) -> bool:
    """Whether transparent huge pages can back an ``madvise``d mapping (``always`` or ``madvise``)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return False
    start, end = text.find("["), text.find("]")
    return start >= 0 and end > start and text[start + 1 : end] in ("always", "madvise")


def tuned_env(
    environ: Mapping[str, str], thp: bool | None = None, libc: str | None = None
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should run as it is."""
    if environ.get(OPT_OUT, "tuned") == "default":
        return None
    libc = platform.libc_ver()[0] if libc is None else libc
    if not sys.platform.startswith("linux") or libc != "glibc":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:  # the user's settings (or this process's, after the exec) stand
        return None
    if not (huge_pages_available() if thp is None else thp):
        return None  # 4 KiB faults for every temporary: slower, and not worth it
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLES}" if current else TUNABLES}


def reexec_tuned(module: str = "qtool") -> None:
    """Re-execute ``python -m module ARGS`` with :func:`tuned_env` when it says so (the same process
    id: torchrun still sees its worker). Returns only when there is nothing to change or the exec
    failed (then the command runs as it is)."""
    env = tuned_env(os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
    except OSError:
        return
