"""The ``fastsave`` command as ``python -m fastsave`` runs it, then a report of the gloo threads
still running in this process, for tests/test_distributed_save.py to run under torchrun.

The process group the command made must be gone once it returns, and gloo's threads with it:
threads left running were torn down at the interpreter's exit, which aborted a rank about once in
50 runs after the checkpoint was published.
"""

import os
import sys
from pathlib import Path

from fastsave.cli import main

if __name__ == "__main__":
    status = main(sys.argv[1:])
    names = (task.joinpath("comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    left = sorted(name for name in names if "gloo" in name)
    print(f"rank {os.environ.get('RANK')}: gloo threads left {left}", file=sys.stderr, flush=True)
    sys.exit(status)
