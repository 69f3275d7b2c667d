"""raydseg.alloc: after keep_freed_memory, freed scratch is reused instead of page-faulted in afresh."""
from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from raydseg.alloc import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_freed_scratch_is_reused_without_page_faults():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent

    def faults_of_one_scratch_cycle() -> int:
        """Page faults of allocating, touching and freeing a sweep's worth of scratch images (0.25-4 MB each);
        glibc's defaults take ~2000 here every time, however often it repeats."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [np.ones(n, np.float32) for n in (131072, 262144, 65536, 500000, 131072, 1000000)]
        assert sum(float(b[-1]) for b in blocks) == 6.0
        del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_one_scratch_cycle()  # the heap grows once
    assert max(faults_of_one_scratch_cycle() for _ in range(4)) < 100
