"""Huge pages for the daemon's heap: which mappings are advised, and what the kernel does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sidecar.huge_pages import HUGE_PAGE, HugePages, _anonymous_ranges, thp_mode
from sidecar.tests.helpers import REPO

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1234    /usr/bin/python3.11
55d0c1000000-55d0c5400000 rw-p 00000000 00:00 0       [heap]
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0
7f0000a00000-7f0000b00000 rw-p 00000000 00:00 0
7f0000b00000-7f0001000000 r--p 00000000 00:00 0
7f0001000000-7f0002000000 rw-s 00000000 00:05 77      /dev/zero (deleted)
7f0002000000-7f0003000000 rw-p 00000000 fd:01 99      /tmp/some.db
7f0003100000-7f0003700000 rw-p 00000000 00:00 0
7ffc00000000-7ffc00800000 rw-p 00000000 00:00 0       [stack]
"""


def test_private_writable_anonymous_mappings_and_the_heap_are_advised_in_whole_huge_pages() -> None:
    ranges = _anonymous_ranges(MAPS)
    assert ranges == [
        (0x55D0C1000000, 0x55D0C5400000),  # the heap, already aligned
        (0x7F0000000000, 0x7F0000A00000),  # anonymous, 10 MiB
        (0x7F0003200000, 0x7F0003600000),  # trimmed to its 2 MiB-aligned middle
    ]
    # Left out: files, read-only, shared, the stack, and a mapping under one huge page.
    assert all(lo % HUGE_PAGE == 0 and hi % HUGE_PAGE == 0 for lo, hi in ranges)


def test_the_kernel_mode_is_read_from_its_bracket(tmp_path: Path) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert thp_mode(mode) == "madvise"
    assert HugePages(True, mode_file=mode).active == (sys.platform == "linux")
    assert not HugePages(False, mode_file=mode).active  # SIDECAR_HUGE_PAGES=off
    mode.write_text("always madvise [never]\n")
    never = HugePages(True, mode_file=mode)
    assert not never.active and never.advise() is None
    assert never.status() == {"enabled": True, "kernel_mode": "never", "active": False, "last": None}
    assert thp_mode(tmp_path / "missing") is None
    assert not HugePages(True, mode_file=tmp_path / "missing").active


PROBE = """
import json, sys
from sidecar.huge_pages import HugePages
held = bytearray(64 << 20)  # 64 MiB, every page touched
for i in range(0, len(held), 4096):
    held[i] = 1
pages = HugePages(True)
first = pages.advise()
again = pages.advise()
print(json.dumps({"active": pages.active,
                  "f": None if first is None else [first.mappings, first.advised_bytes, first.refused,
                                                   first.huge_bytes],
                  "a": None if again is None else [again.mappings, again.advised_bytes]}))
"""


def test_a_real_heap_goes_onto_huge_pages_where_the_kernel_allows() -> None:
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, check=True,
                                    capture_output=True, text=True, timeout=60).stdout)
    if thp_mode() not in ("madvise", "always"):
        assert not out["active"] and out["f"] is None  # nothing asked of a kernel without them
        return
    mappings, advised, refused, huge = out["f"]
    assert mappings >= 1 and advised >= 32 << 20, out
    # What could not be collapsed now is counted; what could is on huge pages.
    assert refused > 0 or huge >= 32 << 20, out
    again_mappings, again_advised = out["a"]
    assert again_advised < advised  # the mappings advised already are not advised again
