"""``python -m fastkd.data --bench DATA``: the streaming loader's throughput alone (img/s), no model.

Forwards to :func:`fastkd.data.stream.main` (``--img-size``, ``--batch-size``, ``--workers``, ``--steps``,
``--val-data``)."""

import sys

from fastkd.data.stream import main

if __name__ == "__main__":
    sys.exit(main())
