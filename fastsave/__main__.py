"""``python -m fastsave ...``: the ``fastsave`` command, also as torchrun starts it.

``torchrun --nproc-per-node N -m fastsave merge ADAPTER_DIR OUT_DIR ...`` runs the merge on N ranks
that share the work (fastsave.cli.merge).
"""

import sys

from fastsave.cli import main

if __name__ == "__main__":
    sys.exit(main())
