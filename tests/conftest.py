import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Cluster  # noqa: E402


@pytest.fixture(scope="session")
def ranks():
    """``ranks(P)``: a pool of P gloo CPU ranks, started once for the whole session."""
    pools: dict[int, Cluster] = {}

    def get(world: int) -> Cluster:
        if world not in pools:
            pools[world] = Cluster(world)
        return pools[world]

    yield get
    for pool in pools.values():
        pool.stop()
    for pool in pools.values():
        pool.close()
