"""Memory technologies: how a bus width and a pin rate become a bandwidth.

Chapter 02's library. A DRAM interface moves ``bus_width`` bits in parallel, each pin at
``pin_rate`` bits per second, so its peak bandwidth is ``pin_rate * bus_width / 8``
bytes per second (:func:`interface_bandwidth`). HBM gets there with a very wide, slow
bus (1024 bits per stack, on a silicon interposer); GDDR with a narrow, fast one
(32 bits per device, tens of Gb/s per pin); LPDDR with narrow channels built for low
power.

Two registries, each figure with its source:

* :data:`TECHNOLOGIES`: the top per-pin rate each standard (or, where no standard
  exists, the vendor) specifies, and the width of one stack, device or channel;
* :data:`GPU_MEMORY`: how each GPU in ``utils.hardware`` is wired to its memory (bus
  width, number of stacks, and the pin rate where the vendor publishes it). The
  bandwidth itself lives in ``utils.hardware`` only.

SI units: bit/s per pin, bits of bus width, bytes per second.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from . import hardware
from .validate import UnknownName, check_positive

__all__ = ["MemoryTech", "GPUMemory", "TECHNOLOGIES", "GPU_MEMORY", "interface_bandwidth",
           "implied_pin_rate", "tech", "gpu_memory", "decode_ceiling"]

Gbps = 1e9      # bit/s per pin


def _positive(name: str, x) -> float:
    return float(check_positive(name, x))


def interface_bandwidth(pin_rate: float, bus_width: float) -> float:
    """Peak bandwidth (B/s) of a bus of ``bus_width`` bits at ``pin_rate`` bit/s per pin."""
    return _positive("pin_rate", pin_rate) * _positive("bus_width", bus_width) / 8


def implied_pin_rate(bandwidth: float, bus_width: float) -> float:
    """The per-pin rate (bit/s) a ``bandwidth`` (B/s) needs on ``bus_width`` bits."""
    return _positive("bandwidth", bandwidth) * 8 / _positive("bus_width", bus_width)


@dataclass(frozen=True)
class MemoryTech:
    """A memory technology at the top rate its specification gives."""

    name: str
    family: str            # "HBM", "GDDR", "LPDDR"
    pin_rate: float        # bit/s per pin, the highest rate specified
    unit_width: int        # bits per stack (HBM), device (GDDR) or channel (LPDDR)
    unit: str
    source: str
    notes: str = ""

    @property
    def unit_bandwidth(self) -> float:
        """Peak B/s of one stack, device or channel at ``pin_rate``."""
        return interface_bandwidth(self.pin_rate, self.unit_width)


_TECHS = {
    "HBM2": MemoryTech(
        "HBM2", "HBM", 2.4 * Gbps, 1024, "stack",
        "JEDEC JESD235B (December 2018 update of the HBM standard): per-pin rate extended to "
        "2.4 Gb/s, 1024-bit interface per stack in 8 channels, up to 307 GB/s per stack; "
        "the earlier revision gave 2 Gb/s (256 GB/s)"),
    "HBM2e": MemoryTech(
        "HBM2e", "HBM", 3.2 * Gbps, 1024, "stack",
        "Samsung Flashbolt HBM2E announcement (February 2020): 3.2 Gb/s per pin, 410 GB/s "
        "per stack",
        notes="HBM2E is a vendor name for the faster HBM2 parts; later vendor bins run faster."),
    "HBM3": MemoryTech(
        "HBM3", "HBM", 6.4 * Gbps, 1024, "stack",
        "JEDEC JESD238 HBM3 (January 2022): data rates up to 6.4 Gb/s per pin, 819 GB/s "
        "per device (1024-bit), 16 channels"),
    "HBM3e": MemoryTech(
        "HBM3e", "HBM", 9.2 * Gbps, 1024, "stack",
        "Micron HBM3E (HBM3 Gen2) announcement (July 2023) and volume production (February "
        "2024): pin speed above 9.2 Gb/s on a 1024-bit stack",
        notes="Not a separate JEDEC standard at launch: a vendor extension of HBM3's rates. "
              "9.2 Gb/s is the rate Micron states as its floor."),
    "GDDR6": MemoryTech(
        "GDDR6", "GDDR", 16 * Gbps, 32, "device",
        "JEDEC JESD250 GDDR6 (July 2017): up to 16 Gb/s per pin; a device has two "
        "independent 16-bit channels (32 bits)"),
    "GDDR6X": MemoryTech(
        "GDDR6X", "GDDR", 21 * Gbps, 32, "device",
        "NVIDIA Ada GPU Architecture whitepaper (2023), GeForce RTX 4090: GDDR6X at 21 Gbps "
        "on a 384-bit bus (12 devices of 32 bits)",
        notes="Micron's GDDR6X sends 2 bits per symbol (PAM4); not a JEDEC standard. The "
              "rate stored is the one the registry's GPU runs, not the fastest bin."),
    "LPDDR5": MemoryTech(
        "LPDDR5", "LPDDR", 6.4 * Gbps, 16, "channel",
        "JEDEC JESD209-5 LPDDR5 (February 2019): up to 6400 Mb/s per pin, 16-bit channels"),
    "LPDDR5X": MemoryTech(
        "LPDDR5X", "LPDDR", 8.533 * Gbps, 16, "channel",
        "JEDEC JESD209-5B (June 2021), the LPDDR5X extension: up to 8533 Mb/s per pin"),
}

TECHNOLOGIES: Mapping[str, MemoryTech] = MappingProxyType(_TECHS)


def tech(name: str) -> MemoryTech:
    """The technology ``name`` (case-insensitive), e.g. ``"HBM3e"``."""
    if not isinstance(name, str):
        raise TypeError(f"memory technology name must be a string, got {type(name).__name__}")
    for key, value in _TECHS.items():
        if key.lower() == name.strip().lower():
            return value
    raise UnknownName(f"unknown memory technology name {name!r}; known: {', '.join(_TECHS)}")


@dataclass(frozen=True)
class GPUMemory:
    """How one GPU is wired to its memory. None: the vendor does not publish it."""

    gpu: str                          # a name in utils.hardware
    technology: str                   # a key of TECHNOLOGIES
    bus_width: Optional[int]          # bits
    stacks: Optional[int]             # HBM stacks (None for GDDR)
    pin_rate: Optional[float]         # bit/s per pin, where published
    source: str

    @property
    def bandwidth(self) -> float:
        """The datasheet bandwidth, from ``utils.hardware`` (B/s)."""
        return hardware.get(self.gpu).memory_bandwidth


_GPU_MEMORY = {
    "H100-SXM": GPUMemory(
        "H100-SXM", "HBM3", 5120, 5, None,
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): H100 SXM5 has five HBM3 "
        "stacks on ten 512-bit memory controllers (5120 bits); the pin rate is not published"),
    "H200": GPUMemory(
        "H200", "HBM3e", None, None, None,
        "NVIDIA H200 datasheet (2024) gives 141 GB HBM3e and 4.8 TB/s but neither the bus "
        "width nor the pin rate"),
    "B200": GPUMemory(
        "B200", "HBM3e", None, None, None,
        "NVIDIA HGX B200 datasheet (2024) gives 180 GB HBM3e and 8 TB/s per GPU but neither "
        "the bus width nor the pin rate"),
    "A100-SXM-80GB": GPUMemory(
        "A100-SXM-80GB", "HBM2e", 5120, 5, None,
        "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): five active HBM stacks, "
        "5120-bit interface (the 80GB part keeps it with HBM2e); the 80GB pin rate is not "
        "published"),
    "A100-SXM-40GB": GPUMemory(
        "A100-SXM-40GB", "HBM2", 5120, 5, 2.43 * Gbps,
        "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), Table 1: 5120-bit HBM2, "
        "memory data rate 1215 MHz DDR (2.43 Gb/s per pin), 1555 GB/s"),
    "L4": GPUMemory(
        "L4", "GDDR6", None, None, None,
        "NVIDIA L4 datasheet (2023) gives 24 GB GDDR6 and 300 GB/s but neither the bus width "
        "nor the pin rate"),
    "MI300X": GPUMemory(
        "MI300X", "HBM3", 8192, 8, None,
        "AMD CDNA 3 architecture whitepaper (2023): eight HBM3 stacks behind a 128-channel "
        "interface (8 x 1024 bits); the pin rate is not stated there"),
    "RTX-4090": GPUMemory(
        "RTX-4090", "GDDR6X", 384, None, 21 * Gbps,
        "NVIDIA Ada GPU Architecture whitepaper (2023), Appendix A: 384-bit GDDR6X at 21 Gbps, "
        "1008 GB/s"),
}

GPU_MEMORY: Mapping[str, GPUMemory] = MappingProxyType(_GPU_MEMORY)


def gpu_memory(name: str) -> GPUMemory:
    """The memory wiring of GPU ``name`` (any name or alias ``utils.hardware`` accepts)."""
    return _GPU_MEMORY[hardware.get(name).name]


def decode_ceiling(n_params: float, bytes_per_param: float, bandwidth: float) -> float:
    """Upper bound on tokens/s for batch-1 decode: every weight is read once per token.

    ``bandwidth / (n_params * bytes_per_param)``; the KV cache and activations only add
    bytes, so the true rate is lower.
    """
    n = _positive("n_params", n_params)
    s = _positive("bytes_per_param", bytes_per_param)
    return _positive("bandwidth", bandwidth) / (n * s)
