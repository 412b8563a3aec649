#!/usr/bin/env python3
"""Run callcp's benchmarks: ``python benchmarks/run.py [options]`` (``--help`` lists them).

callcp against Python's ssl (TLS 1.3) and raw TCP, in one run; the harness is
callcp_bench.py, next to this file.  Results go to benchmarks/results/local/
(ignored by git); ``--save`` writes the committed benchmarks/results/ instead.
See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import callcp  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import callcp_bench  # this directory is sys.path[0] when run as a script

if __name__ == "__main__":  # required: the benchmark's processes are spawned
    sys.exit(callcp_bench.main(sys.argv[1:], prog=f"python {Path(sys.argv[0]).as_posix()}"))
