"""The chips a plan can target and how a `--topology` name maps onto them.

Per-chip figures are public datasheet values (bf16 dense peak, HBM, HBM bandwidth, and
bidirectional inter-chip bandwidth per chip), each with its source:

- TPU v4: cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GB/s); ICI: six links of
  50 GB/s each way per chip (Jouppi et al., "TPU v4", ISCA 2023), 600 GB/s bidirectional.
- TPU v5e: cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB, 819 GB/s, ICI 400 GB/s).
- TPU v5p: cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GB, 2765 GB/s, ICI 1200 GB/s).
- TPU v6e: cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB, 1638 GB/s, ICI 800 GB/s).
- H100 SXM, H200 SXM: NVIDIA datasheets (989 TFLOP/s dense bf16; 80 GB at 3.35 TB/s and
  141 GB at 4.8 TB/s; NVLink 900 GB/s).

`hbm_bytes` of a TPU is what the compiler (libtpu 0.0.42.1) reports as available to one
device, e.g. "exceeds available HBM (95.74G)" on v5p: the budget a program must fit, a little
under the datasheet capacity. A TPU v4 chip compiles as two devices (one per TensorCore, no
megacore), so its per-device figures are half the chip's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from phijax.errors import ConfigError

GiB = 2 ** 30


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 FLOP/s per device
    hbm_bytes: Optional[float]  # per device; None: no fixed budget (host memory)
    hbm_bandwidth: float  # bytes/s per device
    ici_bandwidth: float  # bytes/s per device, both directions together
    devices_per_chip: int = 1
    torus_dims: int = 0  # 3: v4/v5p slices (AxBxC), 2: v5e/v6e (AxB), 0: not a TPU
    cores_in_name: bool = False  # v4-N and v5p-N count TensorCores (2 per chip)


CHIPS = {
    "v4": Chip("TPU v4", 275e12 / 2, 15.25 * GiB, 1200e9 / 2, 600e9 / 2, devices_per_chip=2,
               torus_dims=3, cores_in_name=True),
    "v5e": Chip("TPU v5e", 197e12, 15.75 * GiB, 819e9, 400e9, torus_dims=2),
    "v5p": Chip("TPU v5p", 459e12, 95.74 * GiB, 2765e9, 1200e9, torus_dims=3,
                cores_in_name=True),
    "v6e": Chip("TPU v6e", 918e12, 31.25 * GiB, 1638e9, 800e9, torus_dims=2),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, 900e9),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141e9, 4.8e12, 900e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclass(frozen=True)
class Topology:
    name: str  # as given: v5p-128, v6e-256, cpu-8, h100x8
    kind: str  # "tpu" (deviceless compile), "cpu" (host devices), "gpu" (analytic)
    chip: Chip
    devices: int
    libtpu_name: Optional[str] = None  # e.g. "v5p:4x4x4"
    accelerator: Optional[str] = None  # Cloud TPU's accelerator type, e.g. "v5p-128"

    @property
    def chips(self) -> int:
        return self.devices // self.chip.devices_per_chip


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape of `chips` chips: from the one-host block (2x2x1 or 2x2), the smallest
    side doubled until the count is reached (4x4x4 for 64 v5p chips, 16x16 for 256 v6e)."""
    shape = [2, 2, 1] if dims == 3 else [2, 2]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def _tpu(name: str, family: str, count: int) -> Topology:
    chip = CHIPS[family]
    chips = count // 2 if chip.cores_in_name else count
    unit = "TensorCores (2 per chip)" if chip.cores_in_name else "chips"
    if chips < 4 or chips & (chips - 1) or (chip.cores_in_name and count % 2):
        raise ConfigError(f"--topology {name}: {family}-N counts {unit}; plans cover slices of "
                          f"4, 8, 16, ... chips (e.g. {family}-{8 if chip.cores_in_name else 4})")
    shape = torus_shape(chips, chip.torus_dims)
    return Topology(name, "tpu", chip, chips * chip.devices_per_chip,
                    f"{family}:{'x'.join(map(str, shape))}", f"{family}-{count}")


def parse_topology(name: str) -> Topology:
    """`v5p-128`, `v6e-256`, `v5e-16` (`v5litepod-16`), `v4-32`, a libtpu name such as
    `v5p:4x4x8`, `cpu-8`, `h100x8` or `h200x16`."""
    text = name.strip().lower()
    if m := re.fullmatch(r"cpu-?(\d+)", text):
        return Topology(name, "cpu", Chip("host CPU", 0.0, None, 0.0, 0.0), int(m.group(1)))
    if m := re.fullmatch(r"(h100|h200)[x-](\d+)", text):
        return Topology(name, "gpu", CHIPS[m.group(1)], int(m.group(2)))
    if m := re.fullmatch(r"([a-z0-9]+)-(\d+)", text):
        family = ALIASES.get(m.group(1), m.group(1))
        if family in CHIPS and CHIPS[family].torus_dims:
            return _tpu(name, family, int(m.group(2)))
    if m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text):
        family = ALIASES.get(m.group(1), m.group(1))
        if family in CHIPS and CHIPS[family].torus_dims:
            chips = math.prod(int(s) for s in m.group(2).split("x"))
            chip = CHIPS[family]
            count = chips * (2 if chip.cores_in_name else 1)
            return Topology(name, "tpu", chip, chips * chip.devices_per_chip,
                            f"{family}:{m.group(2)}", f"{family}-{count}")
    raise ConfigError(f"--topology {name}: expected a TPU slice (v4-8, v5e-8, v5p-8, v6e-8, or "
                      f"a shape such as v5p:4x4x4), cpu-N, h100xN or h200xN")


def parse_bytes(text: str) -> float:
    """'16GiB', '95.74G', '2e9' -> bytes (G and GiB are powers of two, GB powers of ten)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMGT]?)(i?B?)\s*", text)
    try:
        value = float(m.group(1)) if m else float("nan")
    except ValueError:
        value = float("nan")
    if not m or math.isnan(value):
        raise ConfigError(f"{text!r} is not a size like 16GiB or 2e9")
    power = "KMGT".find(m.group(2)) + 1
    base = 1000 if m.group(3) == "B" else 1024
    return value * base ** power
