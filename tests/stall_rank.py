"""`python tests/stall_rank.py ARGS` is `bigtrain ARGS`, except that the rank named by
BIGTRAIN_TEST_STALL_RANK sleeps BIGTRAIN_TEST_STALL_S seconds before its second micro-batch: a
rank that hangs mid-run (for the collective-timeout tests)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigtrain.data import dataset  # noqa: E402

if os.environ.get("RANK") == os.environ.get("BIGTRAIN_TEST_STALL_RANK"):
    _next_batch, _calls = dataset.BatchLoader.next_batch, [0]

    def _stalled(self):
        _calls[0] += 1
        if _calls[0] == 2:
            time.sleep(float(os.environ["BIGTRAIN_TEST_STALL_S"]))
        return _next_batch(self)

    dataset.BatchLoader.next_batch = _stalled

from bigtrain.cli import main  # noqa: E402

sys.exit(main())
