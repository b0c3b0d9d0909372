"""The processes of one multi-host sweep worker, and their agreement on the next cell.

A multi-host cell runs one worker per host. The workers find each other as their runs would (the
cells' `run.distributed` and the environment, see phijax.train.distributed), or from
--coordinator, --num-processes and --process-id, and start a CPU-only JAX of their own on the
runs' coordinator port + 1, so the runs keep their devices and their port. Process 0 claims a
cell and broadcasts its index (`multihost_utils.broadcast_one_to_all`) to the others.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from phijax.errors import ConfigError

log = logging.getLogger("phijax")


class Hosts:
    """The processes of one multi-host worker, found as its runs find theirs (`run.distributed`
    of the cells, phijax.train.distributed); a single process needs no agreement. Their JAX is
    CPU-only, on the runs' coordinator port + 1, so the runs keep their devices and port."""

    def __init__(self, opts, mode: str):
        self.count, self.index = 1, 0
        found = _explicit_hosts(opts) or _detected_hosts(mode)
        if found is None:
            return
        address, self.count, self.index = found
        if self.count <= 1:
            return
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
        import jax
        jax.distributed.initialize(coordinator_address=address, num_processes=self.count,
                                   process_id=self.index, cluster_detection_method="deactivate")
        log.info("sweep worker: process %d of %d, agreeing through %s", self.index, self.count,
                 address)

    @property
    def primary(self) -> bool:
        return self.index == 0

    def agree(self, value: int) -> int:
        """Process 0's `value`, on every process."""
        if self.count <= 1:
            return value
        import numpy as np
        from jax.experimental import multihost_utils
        return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _explicit_hosts(opts) -> Optional[tuple[str, int, int]]:
    given = (opts.coordinator, opts.num_processes, opts.process_id)
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise ConfigError("give all of --coordinator, --num-processes and --process-id")
    return opts.coordinator, opts.num_processes, opts.process_id


def _detected_hosts(mode: str) -> Optional[tuple[str, int, int]]:
    """(the runs' coordinator with its port + 1, process count, process id) from the
    environment, as phijax.train.distributed and JAX's cluster detection find them."""
    from phijax.train.distributed import plan

    start = plan(os.environ, mode)
    if start is None:
        return None
    k = start.kwargs
    address, count, index = k.get("coordinator_address"), k.get("num_processes"), \
        k.get("process_id")
    if None in (address, count, index):
        os.environ["JAX_PLATFORMS"] = "cpu"
        from jax._src.clusters import ClusterEnv  # what JAX's own start-up detects
        address, count, index, _ = ClusterEnv.auto_detect_unset_distributed_params(
            address, count, index, None, None, 300)
    if address is None or ":" not in address:
        raise ConfigError(f"sweep worker: {start.cluster}: no coordinator address found; give "
                          f"--coordinator HOST:PORT, --num-processes and --process-id")
    host, port = address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}", int(count), int(index)
