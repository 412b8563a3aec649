#!/usr/bin/env python3
"""Run callcp's benchmarks: ``python benchmarks/run.py [options]``.

The same as ``callcp bench [options]`` (``--help`` lists them): callcp against
Python's ssl (TLS 1.3) and raw TCP, in one run. Results go to
benchmarks/results/ by default; see benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import callcp  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from callcp.cli import main

if __name__ == "__main__":  # required: the benchmark's processes are spawned
    sys.exit(main(["bench", *sys.argv[1:]]))
