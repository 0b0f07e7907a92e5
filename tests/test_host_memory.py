"""The huge-page hint: when it fires, and that its fix really gives large allocations huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cftjax.host_memory import HUGETLB_TUNABLE, huge_pages_hint, thp_mode


def _mode_file(tmp_path, text: str) -> str:
  path = tmp_path / "enabled"
  path.write_text(text + "\n")
  return str(path)


@pytest.mark.parametrize("mode_text,tunables,hints", [
    ("[always] madvise never", "", False),
    ("always [madvise] never", "", True),
    ("always [madvise] never", HUGETLB_TUNABLE, False),
    ("always [madvise] never", "glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2", False),
    ("always [madvise] never", "glibc.malloc.hugetlb=0", True),
    ("always madvise [never]", HUGETLB_TUNABLE, True),
])
def test_hint_fires_only_without_huge_pages(tmp_path, mode_text, tunables, hints):
  hint = huge_pages_hint(_mode_file(tmp_path, mode_text), tunables)
  assert (hint is not None) == hints
  if hints:
    assert ("GLIBC_TUNABLES" in hint) == ("[madvise]" in mode_text)


def test_no_hint_where_the_mode_cannot_be_read(tmp_path):
  assert huge_pages_hint(str(tmp_path / "missing"), "") is None


# Plain malloc + memset, as XLA's CPU allocator does (numpy would madvise huge pages itself).
_TOUCH_256_MIB = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(tunables: str | None) -> int:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", _TOUCH_256_MIB], env=env, capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


def test_the_recommended_fix_gives_large_allocations_huge_pages():
  mode = thp_mode()
  if mode != "madvise":
    pytest.skip(f"THP mode is {mode!r}; the tunable only matters under 'madvise'")
  default, fixed = _page_faults(None), _page_faults(HUGETLB_TUNABLE)
  assert default > 50_000  # 256 MiB in 4 KiB pages
  assert fixed * 10 < default, (default, fixed)
