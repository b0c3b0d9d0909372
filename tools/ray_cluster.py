"""Finding the Ray cluster, for every tool that runs on Ray (`phijax-tools run --executor ray`,
`phijax-tools corpus run ... executor=ray`): the cluster at RAY_ADDRESS (`ray start --head` on
one machine, `ray start --address HEAD:6379` on the others), else a new local instance."""
from __future__ import annotations

import os
from typing import Optional

from phijax.errors import ConfigError


def one_line_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()


def start_ray(num_cpus: Optional[int], error: type[Exception] = ConfigError) -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local instance with `num_cpus` (default:
    every core); `error` (one line) when Ray cannot start or connect."""
    import ray
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     log_to_driver=False)
    except Exception as e:
        raise error(f"ray: cannot start or connect ({one_line_error(e)})") from None
