"""Whether this process's large host allocations get transparent huge pages, and how to fix it if not.

XLA on CPU allocates every step's temporaries afresh. With 4 KiB pages each step first-touches them
page by page: 1.1M page faults per CFT step of the benchmark model, and the step runs 1.25x faster
on 2 MiB pages (docs/benchmarks.md). glibc only asks for huge pages when told to.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


def thp_mode(mode_path: str = THP_MODE_PATH) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), None if unreadable."""
  try:
    with open(mode_path) as f:
      mode = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return mode.group(1) if mode else None


def huge_pages_hint(mode_path: str = THP_MODE_PATH, glibc_tunables: str | None = None) -> str | None:
  """A one-line hint when large allocations of this process get 4 KiB pages, else None.

  None also when the kernel's transparent-huge-page mode cannot be read (not Linux). glibc_tunables
  defaults to $GLIBC_TUNABLES, which glibc reads at process start only.
  """
  mode = thp_mode(mode_path)
  if mode in (None, "always"):
    return None
  if glibc_tunables is None:
    glibc_tunables = os.environ.get("GLIBC_TUNABLES", "")
  if mode == "madvise" and re.search(r"glibc\.malloc\.hugetlb=[12]", glibc_tunables):
    return None
  fix = (f"start the process with GLIBC_TUNABLES={HUGETLB_TUNABLE}" if mode == "madvise"
         else f"set {mode_path} to 'always' or 'madvise' (root)")
  return (f"host memory: transparent huge pages are '{mode}' and glibc does not request them, "
          f"so XLA's CPU buffers use 4 KiB pages; on CPU backends train steps run up to 1.25x slower. "
          f"Fix: {fix} (docs/troubleshooting.md)")


def log_huge_pages_hint() -> None:
  """Logs `huge_pages_hint()` as a warning when there is one."""
  hint = huge_pages_hint()
  if hint:
    logger.warning("%s", hint)
