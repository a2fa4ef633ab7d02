"""The node's C-heap setting: large blocks keep their own mappings, so freed ones leave the process.

The behaviour is glibc's, checked in a fresh interpreter per case (``mallopt`` is process-wide): a
block of 8 MiB, freed and allocated again, is mapped again only with the threshold pinned --
without it the first free raises glibc's threshold and the second block comes from the heap,
where it would stay once freed (what made a churning node's RSS swing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_server.heap import pin_mmap_threshold
from tests.edge_server.procs import ClusterProcs, wait_until

PROBE = r"""
import ctypes, json, sys
from edge_server.heap import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
size = 8 * 1024 * 1024
libc.free(libc.malloc(size))  # a mapped block freed: glibc's dynamic threshold rises to its size
mapped_before = libc.mallinfo2().hblks
block = libc.malloc(size)
mapped = libc.mallinfo2().hblks - mapped_before
libc.free(block)
print(json.dumps({"pinned": pinned, "second_block_mapped": mapped == 1}))
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not pin_mmap_threshold(),
                                reason="the setting is glibc's")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    return json.loads(out.stdout)


@glibc_only
def test_a_large_block_is_mapped_again_after_a_free_only_with_the_threshold_pinned() -> None:
    assert _probe("pin") == {"pinned": True, "second_block_mapped": True}
    assert _probe("default") == {"pinned": False, "second_block_mapped": False}


@glibc_only
def test_a_node_pins_the_threshold_before_it_serves(tmp_path: Path) -> None:
    with ClusterProcs(tmp_path, regions=["eu"]) as cluster:
        log = cluster.nodes["eu-1"].child.stderr_path  # the node logs JSON lines to stderr

        def serving() -> dict | None:
            for line in log.read_text().splitlines():
                if '"node serving"' in line:
                    return json.loads(line)
            return None

        line = wait_until(serving, timeout=10.0, what="the node serving log line")
        assert line["mmap_threshold_pinned"] is True
