"""Hardware registry: accelerators and the links between them.

Every number here is a published figure with its source beside it, stored in SI base
units (bytes, FLOP/s, B/s, watts). Convert only when displaying.

Conventions, stated once so that every chapter can rely on them:

* ``peak_flops`` are **dense** tensor-core (matrix-engine) figures. Datasheets for
  Ampere and later often print the 2:4 structured-sparsity figure first; we always
  store half of it. "fp32" is the plain (non-tensor-core) FP32 rate, "tf32" is the
  tensor-core TF32 rate. For GeForce parts the fp16/bf16/fp8 entries are the rates
  with FP32 accumulation, the mode a training framework uses.
* ``memory_bytes``: the capacity as marketed. HBM and GDDR capacities are binary (an
  "80 GB" H100 has five 16 GiB stacks) so "N GB" is stored as N GiB; the device reports
  slightly less to the application because the driver reserves some.
* ``memory_bandwidth`` and link bandwidths are decimal (1 TB/s = 1e12 B/s), as vendors
  quote them.
* ``link_bandwidth`` is GPU-to-GPU bandwidth **per direction**. NVIDIA quotes NVLink as
  the bidirectional total ("900 GB/s" on H100 is 450 GB/s each way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .validate import UnknownName, check_number, resolve_gpu

KiB, MiB, GiB = 2**10, 2**20, 2**30
GB, TB = 1e9, 1e12
TFLOPS = 1e12


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator as its vendor specifies it (SI units)."""

    name: str
    vendor: str
    architecture: str
    peak_flops: Mapping[str, float]          # dtype -> dense FLOP/s (or OP/s for int8)
    memory_bytes: float
    memory_type: str
    memory_bandwidth: float                  # B/s
    l2_bytes: Optional[float]                # None where the vendor does not publish it
    tdp_watts: float
    compute_units: int
    compute_unit_kind: str                   # "SM" (NVIDIA) or "CU" (AMD)
    link_name: str
    link_bandwidth: float                    # B/s per direction, GPU to GPU
    source: str
    notes: str = ""
    # Per-SM (per-CU on AMD) on-chip memory, bytes; None where no primary source gives it.
    smem_per_sm: Optional[float] = None          # largest shared-memory (LDS) carve-out
    register_file_per_sm: Optional[float] = None
    sm_source: str = ""                          # where the two figures above come from

    @property
    def sm_count(self) -> int:
        """Streaming multiprocessors (NVIDIA) or compute units (AMD): ``compute_units``."""
        return self.compute_units

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; a clear error when the part lacks it."""
        try:
            return self.peak_flops[dtype]
        except (KeyError, TypeError):
            raise UnknownName(
                f"{self.name} has no published dense peak for dtype {dtype!r}; "
                f"it has: {', '.join(sorted(self.peak_flops))}"
            ) from None


@dataclass(frozen=True)
class LinkSpec:
    """A link or network port: bandwidth per direction (B/s)."""

    name: str
    kind: str                                # "pcie", "nvlink", "infiniband", "ethernet"
    bandwidth: float                         # B/s per direction
    source: str
    notes: str = ""


def _cuda_cc(cc: str, smem_kib: int) -> str:
    return ("NVIDIA CUDA C++ Programming Guide (2024), 'Technical Specifications per Compute "
            f"Capability' table, compute capability {cc}: maximum shared memory per SM "
            f"{smem_kib} KB (the largest carve-out of the unified L1/shared array), 64K "
            "32-bit registers per SM (256 KiB); KB there is 1024 bytes")


def _gpu(**kw) -> GPUSpec:
    kw["peak_flops"] = MappingProxyType(dict(kw["peak_flops"]))
    return GPUSpec(**kw)


_GPUS = {
    "H100-SXM": _gpu(
        name="H100-SXM", vendor="NVIDIA", architecture="Hopper",
        peak_flops={"fp64": 67 * TFLOPS, "fp32": 67 * TFLOPS, "tf32": 494.5 * TFLOPS,
                    "bf16": 989.5 * TFLOPS, "fp16": 989.5 * TFLOPS,
                    "fp8": 1979 * TFLOPS, "int8": 1979 * TFLOPS},
        memory_bytes=80 * GiB, memory_type="HBM3", memory_bandwidth=3.35 * TB,
        l2_bytes=50 * MiB, tdp_watts=700, compute_units=132, compute_unit_kind="SM",
        link_name="NVLink 4 (18 links)", link_bandwidth=450 * GB,
        source=("NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column: TF32 989, "
                "BF16/FP16 1,979, FP8/INT8 3,958 TFLOPS with sparsity (halved here); "
                "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 132 SMs, "
                "50 MB L2; NVLink 900 GB/s bidirectional"),
        notes="fp64 is the FP64 tensor-core rate; plain FP64 is 34 TFLOPS.",
        smem_per_sm=228 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("9.0", 228),
    ),
    "H200": _gpu(
        name="H200", vendor="NVIDIA", architecture="Hopper",
        peak_flops={"fp64": 67 * TFLOPS, "fp32": 67 * TFLOPS, "tf32": 494.5 * TFLOPS,
                    "bf16": 989.5 * TFLOPS, "fp16": 989.5 * TFLOPS,
                    "fp8": 1979 * TFLOPS, "int8": 1979 * TFLOPS},
        memory_bytes=141 * GiB, memory_type="HBM3e", memory_bandwidth=4.8 * TB,
        l2_bytes=50 * MiB, tdp_watts=700, compute_units=132, compute_unit_kind="SM",
        link_name="NVLink 4 (18 links)", link_bandwidth=450 * GB,
        source=("NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column: 141 GB "
                "HBM3e, 4.8 TB/s, up to 700 W, same sparse tensor figures as H100 SXM "
                "(halved here); same GH100 die as H100 (132 SMs, 50 MB L2)"),
        smem_per_sm=228 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("9.0", 228),
    ),
    "A100-SXM-80GB": _gpu(
        name="A100-SXM-80GB", vendor="NVIDIA", architecture="Ampere",
        peak_flops={"fp64": 19.5 * TFLOPS, "fp32": 19.5 * TFLOPS, "tf32": 156 * TFLOPS,
                    "bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "int8": 624 * TFLOPS},
        memory_bytes=80 * GiB, memory_type="HBM2e", memory_bandwidth=2039 * GB,
        l2_bytes=40 * MiB, tdp_watts=400, compute_units=108, compute_unit_kind="SM",
        link_name="NVLink 3 (12 links)", link_bandwidth=300 * GB,
        source=("NVIDIA A100 Tensor Core GPU datasheet (2021), A100 80GB SXM column: "
                "TF32 156, BF16/FP16 312, INT8 624 dense; 2,039 GB/s; 400 W; NVLink "
                "600 GB/s bidirectional. NVIDIA A100 Tensor Core GPU Architecture "
                "whitepaper (2020): 108 SMs, 40 MB L2"),
        notes="No FP8 tensor cores on Ampere.",
        smem_per_sm=164 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("8.0", 164),
    ),
    "A100-SXM-40GB": _gpu(
        name="A100-SXM-40GB", vendor="NVIDIA", architecture="Ampere",
        peak_flops={"fp64": 19.5 * TFLOPS, "fp32": 19.5 * TFLOPS, "tf32": 156 * TFLOPS,
                    "bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "int8": 624 * TFLOPS},
        memory_bytes=40 * GiB, memory_type="HBM2", memory_bandwidth=1555 * GB,
        l2_bytes=40 * MiB, tdp_watts=400, compute_units=108, compute_unit_kind="SM",
        link_name="NVLink 3 (12 links)", link_bandwidth=300 * GB,
        source=("NVIDIA A100 Tensor Core GPU datasheet (2021), A100 40GB SXM column: "
                "1,555 GB/s; 400 W; same tensor figures as the 80GB part. A100 "
                "architecture whitepaper (2020): 108 SMs, 40 MB L2"),
        notes="No FP8 tensor cores on Ampere.",
        smem_per_sm=164 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("8.0", 164),
    ),
    "L4": _gpu(
        name="L4", vendor="NVIDIA", architecture="Ada Lovelace",
        peak_flops={"fp32": 30.3 * TFLOPS, "tf32": 60 * TFLOPS, "bf16": 121 * TFLOPS,
                    "fp16": 121 * TFLOPS, "fp8": 242.5 * TFLOPS, "int8": 242.5 * TFLOPS},
        memory_bytes=24 * GiB, memory_type="GDDR6", memory_bandwidth=300 * GB,
        l2_bytes=48 * MiB, tdp_watts=72, compute_units=58, compute_unit_kind="SM",
        link_name="PCIe Gen4 x16 (no NVLink)", link_bandwidth=31.5 * GB,
        source=("NVIDIA L4 Tensor Core GPU datasheet (2023): FP32 30.3 TFLOPS; TF32 120, "
                "FP16/BF16 242, FP8/INT8 485 with sparsity (halved here); 24 GB GDDR6, "
                "300 GB/s, 72 W. NVIDIA Ada GPU Architecture whitepaper (2023): AD104 "
                "with 58 SMs enabled on L4, 48 MB L2"),
        smem_per_sm=100 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("8.9", 100),
    ),
    "MI300X": _gpu(
        name="MI300X", vendor="AMD", architecture="CDNA 3",
        peak_flops={"fp64": 163.4 * TFLOPS, "fp32": 163.4 * TFLOPS, "tf32": 653.7 * TFLOPS,
                    "bf16": 1307.4 * TFLOPS, "fp16": 1307.4 * TFLOPS,
                    "fp8": 2614.9 * TFLOPS, "int8": 2614.9 * TFLOPS},
        memory_bytes=192 * GiB, memory_type="HBM3", memory_bandwidth=5.3 * TB,
        l2_bytes=32 * MiB, tdp_watts=750, compute_units=304, compute_unit_kind="CU",
        link_name="Infinity Fabric (7 links)", link_bandwidth=448 * GB,
        source=("AMD Instinct MI300X data sheet (2023): FP16/BF16 1,307.4, FP8 2,614.9, "
                "INT8 2,614.9, TF32 653.7, FP32 and FP64 matrix 163.4 TFLOPS (dense); "
                "192 GB HBM3, 5.3 TB/s, 750 W, 304 CUs, 896 GB/s peak aggregate "
                "Infinity Fabric bandwidth. AMD CDNA 3 architecture whitepaper (2023): "
                "4 MB L2 per XCD, 8 XCDs, plus 256 MB Infinity Cache"),
        notes=("fp64 is the matrix-core rate; vector FP64 is 81.7 TFLOPS. The 256 MB "
               "Infinity Cache sits between L2 and HBM and is not counted in l2_bytes."),
        smem_per_sm=64 * KiB, register_file_per_sm=512 * KiB,
        sm_source=("AMD ROCm documentation, 'GPU hardware specifications' table, MI300X row: LDS 64 KiB and VGPR file 512 KiB per CU (2024)"),
    ),
    "B200": _gpu(
        name="B200", vendor="NVIDIA", architecture="Blackwell",
        peak_flops={"fp64": 40 * TFLOPS, "fp32": 80 * TFLOPS, "tf32": 1100 * TFLOPS,
                    "bf16": 2250 * TFLOPS, "fp16": 2250 * TFLOPS,
                    "fp8": 4500 * TFLOPS, "int8": 4500 * TFLOPS, "fp4": 9000 * TFLOPS},
        memory_bytes=180 * GiB, memory_type="HBM3e", memory_bandwidth=8 * TB,
        l2_bytes=None, tdp_watts=1000, compute_units=148, compute_unit_kind="SM",
        link_name="NVLink 5 (18 links)", link_bandwidth=900 * GB,
        source=("NVIDIA HGX B200 datasheet (2024), per GPU: TF32 2.2, FP16/BF16 4.5, "
                "FP8/INT8 9, FP4 18 PFLOPS with sparsity (halved here); FP32 80, FP64 "
                "40 TFLOPS; 180 GB HBM3e (1.44 TB per 8 GPUs), 8 TB/s; 1,000 W; NVLink 5 "
                "1.8 TB/s bidirectional. SM count: 148 (74 per die), Chips and Cheese, "
                "'Nvidia's B200: Keeping the CUDA Juggernaut Rolling' (2025)"),
        notes="NVIDIA has not published the B200's L2 capacity in a datasheet.",
        smem_per_sm=228 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("10.0", 228),
    ),
    "RTX-4090": _gpu(
        name="RTX-4090", vendor="NVIDIA", architecture="Ada Lovelace",
        peak_flops={"fp32": 82.6 * TFLOPS, "tf32": 82.6 * TFLOPS, "bf16": 165.2 * TFLOPS,
                    "fp16": 165.2 * TFLOPS, "fp8": 330.3 * TFLOPS, "int8": 660.6 * TFLOPS},
        memory_bytes=24 * GiB, memory_type="GDDR6X", memory_bandwidth=1008 * GB,
        l2_bytes=72 * MiB, tdp_watts=450, compute_units=128, compute_unit_kind="SM",
        link_name="PCIe Gen4 x16 (no NVLink)", link_bandwidth=31.5 * GB,
        source=("NVIDIA Ada GPU Architecture whitepaper (2023), Appendix A, GeForce RTX "
                "4090: FP32 82.6; TF32 82.6; FP16/BF16 with FP32 accumulate 165.2; FP8 "
                "with FP32 accumulate 330.3; INT8 660.6 TFLOPS/TOPS dense; 128 SMs; "
                "72 MB L2; 24 GB GDDR6X at 21 Gbps on a 384-bit bus (1,008 GB/s); 450 W"),
        notes="GeForce halves the tensor rate with FP32 accumulation; with FP16 "
              "accumulation fp16 is 330.3 TFLOPS.",
        smem_per_sm=100 * KiB, register_file_per_sm=64 * KiB * 4,
        sm_source=_cuda_cc("8.9", 100),
    ),
}

_ALIASES = {"H100": "H100-SXM", "A100": "A100-SXM-80GB", "A100-80GB": "A100-SXM-80GB",
            "A100-40GB": "A100-SXM-40GB", "4090": "RTX-4090"}


def _pcie(gen: int, gts: float, efficiency: float, note: str) -> LinkSpec:
    # x16: 16 lanes x transfer rate x encoding efficiency / 8 bits per byte
    return LinkSpec(
        name=f"PCIe Gen{gen} x16", kind="pcie", bandwidth=16 * gts * 1e9 * efficiency / 8,
        source=f"PCI-SIG PCI Express Base Specification {gen}.0: {gts:g} GT/s per lane, "
               f"{note}", notes="per direction, after line encoding, before packet overhead")


_LINKS = {
    "PCIe Gen1 x16": _pcie(1, 2.5, 8 / 10, "8b/10b encoding"),
    "PCIe Gen2 x16": _pcie(2, 5, 8 / 10, "8b/10b encoding"),
    "PCIe Gen3 x16": _pcie(3, 8, 128 / 130, "128b/130b encoding"),
    "PCIe Gen4 x16": _pcie(4, 16, 128 / 130, "128b/130b encoding"),
    "PCIe Gen5 x16": _pcie(5, 32, 128 / 130, "128b/130b encoding"),
    "PCIe Gen6 x16": _pcie(6, 64, 242 / 256, "PAM4 with 256-byte FLITs (242 bytes payload)"),
    "NVLink 2": LinkSpec("NVLink 2", "nvlink", 150 * GB,
                         "NVIDIA Tesla V100 GPU Architecture whitepaper (2017): 6 links, "
                         "300 GB/s total bidirectional per GPU"),
    "NVLink 3": LinkSpec("NVLink 3", "nvlink", 300 * GB,
                         "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): 12 links, "
                         "600 GB/s total bidirectional per GPU"),
    "NVLink 4": LinkSpec("NVLink 4", "nvlink", 450 * GB,
                         "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 18 links, "
                         "900 GB/s total bidirectional per GPU"),
    "NVLink 5": LinkSpec("NVLink 5", "nvlink", 900 * GB,
                         "NVIDIA Blackwell architecture technical brief (2024): 18 links, "
                         "1.8 TB/s total bidirectional per GPU"),
    "InfiniBand HDR": LinkSpec("InfiniBand HDR", "infiniband", 200e9 / 8,
                               "InfiniBand Trade Association roadmap: HDR 200 Gb/s per 4x port"),
    "InfiniBand NDR": LinkSpec("InfiniBand NDR", "infiniband", 400e9 / 8,
                               "InfiniBand Trade Association roadmap: NDR 400 Gb/s per 4x port"),
    "InfiniBand XDR": LinkSpec("InfiniBand XDR", "infiniband", 800e9 / 8,
                               "InfiniBand Trade Association roadmap: XDR 800 Gb/s per 4x port"),
    "Ethernet 100G": LinkSpec("Ethernet 100G", "ethernet", 100e9 / 8,
                              "IEEE 802.3ba/802.3bj: 100 Gb/s per port"),
    "Ethernet 200G": LinkSpec("Ethernet 200G", "ethernet", 200e9 / 8,
                              "IEEE 802.3bs/802.3cd: 200 Gb/s per port"),
    "Ethernet 400G": LinkSpec("Ethernet 400G", "ethernet", 400e9 / 8,
                              "IEEE 802.3bs: 400 Gb/s per port"),
}

#: Read-only views of the registries.
GPUS: Mapping[str, GPUSpec] = MappingProxyType(_GPUS)
LINKS: Mapping[str, LinkSpec] = MappingProxyType(_LINKS)


def names() -> list[str]:
    """The GPU names the registry knows, in registry order."""
    return list(_GPUS)


def _lookup(table, aliases, name, what):
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a string, got {type(name).__name__} {name!r}")
    if name in table:
        return table[name]
    folded = {k.lower(): k for k in list(table) + list(aliases)}
    key = folded.get(name.strip().lower())
    if key is not None:
        return table[aliases.get(key, key)]
    raise UnknownName(f"unknown {what} name {name!r}; known: {', '.join(table)}")


def get(name: str) -> GPUSpec:
    """The spec of GPU ``name`` (case-insensitive; a few common aliases accepted)."""
    return _lookup(_GPUS, _ALIASES, name, "GPU")


def link(name: str) -> LinkSpec:
    """The spec of link ``name``, e.g. ``"PCIe Gen5 x16"`` or ``"InfiniBand NDR"``."""
    return _lookup(_LINKS, {}, name, "link")


def ridge_point(spec: GPUSpec | str, dtype: str = "bf16") -> float:
    """Arithmetic intensity (FLOP/byte) at which ``spec`` turns compute-bound.

    ridge = peak FLOP/s / memory bandwidth (B/s).
    """
    spec = resolve_gpu(spec, "spec")
    return spec.flops(dtype) / spec.memory_bandwidth


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline: min(peak, intensity x bandwidth), in FLOP/s."""
    check_number("intensity", intensity, nonnegative=True)
    check_number("peak_flops", peak_flops, positive=True)
    check_number("bandwidth", bandwidth, positive=True)
    return min(peak_flops, intensity * bandwidth)


# ---------------------------------------------------------------------------------------
# Systems: whole DGX boxes (chapter 07)
# ---------------------------------------------------------------------------------------
TiB = 2**40


@dataclass(frozen=True)
class SystemSpec:
    """One 8-GPU server as its vendor specifies it (SI units; conventions as above).

    ``gpu_memory_bytes`` follows the GPU registry's convention (an "80 GB" GPU is 80 GiB,
    so "640 GB" of GPU memory is 640 GiB); ``system_memory_bytes`` is DIMM capacity, binary
    ("2 TB" from 32 x 64 GB DIMMs is 2 TiB). ``compute_nics`` are the single-port NICs of
    the compute (east-west) fabric, one per GPU, each of ``compute_nic_link``;
    ``storage_nics`` names the separate storage / in-band cards. ``max_power_watts`` is
    the system's maximum input power (the figure a rack's power budget is planned with).
    """

    name: str
    gpu: str                                 # a GPU registry name
    gpus: int
    gpu_memory_bytes: float
    nvswitches: int                          # NVSwitch chips on the GPU baseboard
    compute_nics: int
    compute_nic_link: str                    # a link registry name
    compute_nic_model: str
    storage_nics: str
    cpus: int
    cpu_model: str
    cpu_cores: int                           # all sockets together
    system_memory_bytes: float
    pcie_link: str                           # the GPUs' and NICs' host link (registry name)
    max_power_watts: float
    rack_units: int
    storage: str
    source: str
    notes: str = ""

    @property
    def gpu_spec(self) -> GPUSpec:
        """The GPU's registry entry."""
        return get(self.gpu)

    @property
    def nic_bandwidth(self) -> float:
        """One compute NIC's port bandwidth, B/s per direction."""
        return link(self.compute_nic_link).bandwidth

    @property
    def network_bandwidth(self) -> float:
        """All compute NICs together, B/s per direction."""
        return self.compute_nics * self.nic_bandwidth

    @property
    def nvlink_bandwidth(self) -> float:
        """One GPU's NVLink bandwidth into the NVSwitch fabric, B/s per direction."""
        return self.gpu_spec.link_bandwidth


_DGX_H100_SOURCE = (
    "NVIDIA DGX BasePOD reference architecture, 'Core Components' table: DGX H100 with 8 "
    "H100 GPUs, 640 GB GPU memory, 4 NVSwitch chips, 2x Intel Xeon Platinum 8480C, 2 TB "
    "system memory, 8x ConnectX-7 400 Gb/s for the compute fabric plus 2 dual-port "
    "ConnectX-7 for storage and in-band management. NVIDIA DGX H100/H200 User Guide, "
    "'Introduction to NVIDIA DGX H100/H200 Systems': 56 cores per CPU (112 in all), 32 "
    "DIMMs, 8U rackmount, OS 2x 1.92 TB NVMe M.2, internal 8x 3.84 TB NVMe U.2; 'Power "
    "Specifications': six 3.3 kW power supplies (4+2 redundant), 10.2 kW max")
_DGX_A100_SOURCE = (
    "NVIDIA DGX A100 datasheet (640 GB system, 2020-2021) and DGX A100 User Guide "
    "(DU-09821-001), 'Component Specifications' and 'Power Specifications': 8x A100 80GB "
    "(640 GB), 6 NVSwitches (second generation; NVIDIA A100 Tensor Core GPU Architecture "
    "whitepaper), 2x AMD EPYC 7742 (64 cores each, 128 in all), 2 TB system memory, 8x "
    "single-port ConnectX-6 VPI 200 Gb/s HDR InfiniBand plus 2x dual-port ConnectX-6 for "
    "storage, PCIe Gen4, 6.5 kW max, 6U, OS 2x 1.92 TB M.2 NVMe, internal 30 TB "
    "(8x 3.84 TB U.2 NVMe)")
_DGX_B200_SOURCE = (
    "NVIDIA DGX B200 User Guide, 'Introduction to NVIDIA DGX B200 Systems', 'DGX B200 "
    "Component Descriptions', 'Mechanical Specifications' and 'Power Specifications': 8x "
    "B200 with 1,440 GB GPU memory, 2x Intel Xeon 8570 (PCIe Gen5, 56 cores each), 2 "
    "fifth-generation NVLink switches (14.4 TB/s aggregate), 4 OSFP ports serving 8x "
    "single-port ConnectX-7 (InfiniBand up to 400 Gb/s), 2x BlueField-3 dual-port DPUs "
    "for storage and in-band management, 2 TB system memory (32 DIMMs, upgradable to "
    "4 TB), OS 2x 1.92 TB NVMe M.2, data cache 8x 3.84 TB NVMe U.2, six 3.3 kW power "
    "supplies (5+1 redundant), 14.3 kW max, 10U. NVIDIA DGX BasePOD reference "
    "architecture, 'Core Components': 8x ConnectX-7 plus 2 BlueField-3")

_SYSTEMS = {
    "DGX-A100": SystemSpec(
        name="DGX-A100", gpu="A100-SXM-80GB", gpus=8, gpu_memory_bytes=640 * GiB,
        nvswitches=6, compute_nics=8, compute_nic_link="InfiniBand HDR",
        compute_nic_model="ConnectX-6 VPI, single port",
        storage_nics="2x dual-port ConnectX-6 VPI", cpus=2, cpu_model="AMD EPYC 7742",
        cpu_cores=128, system_memory_bytes=2 * TiB, pcie_link="PCIe Gen4 x16",
        max_power_watts=6500.0, rack_units=6,
        storage="OS 2x 1.92 TB M.2 NVMe; internal 8x 3.84 TB U.2 NVMe (30 TB)",
        source=_DGX_A100_SOURCE,
        notes="The 640 GB system; the earlier 320 GB system has A100 40GB GPUs and 1 TB."),
    "DGX-H100": SystemSpec(
        name="DGX-H100", gpu="H100-SXM", gpus=8, gpu_memory_bytes=640 * GiB,
        nvswitches=4, compute_nics=8, compute_nic_link="InfiniBand NDR",
        compute_nic_model="ConnectX-7, single port (two per OSFP cage)",
        storage_nics="2x dual-port ConnectX-7", cpus=2,
        cpu_model="Intel Xeon Platinum 8480C", cpu_cores=112,
        system_memory_bytes=2 * TiB, pcie_link="PCIe Gen5 x16", max_power_watts=10_200.0,
        rack_units=8,
        storage="OS 2x 1.92 TB NVMe M.2; internal 8x 3.84 TB NVMe U.2",
        source=_DGX_H100_SOURCE),
    "DGX-B200": SystemSpec(
        name="DGX-B200", gpu="B200", gpus=8, gpu_memory_bytes=1440 * GiB,
        nvswitches=2, compute_nics=8, compute_nic_link="InfiniBand NDR",
        compute_nic_model="ConnectX-7, single port (two per OSFP cage)",
        storage_nics="2x dual-port BlueField-3 DPU", cpus=2,
        cpu_model="Intel Xeon Platinum 8570", cpu_cores=112,
        system_memory_bytes=2 * TiB, pcie_link="PCIe Gen5 x16", max_power_watts=14_300.0,
        rack_units=10,
        storage="OS 2x 1.92 TB NVMe M.2; data cache 8x 3.84 TB NVMe U.2",
        source=_DGX_B200_SOURCE),
}

_SYSTEM_ALIASES = {"dgx h100": "DGX-H100", "dgxh100": "DGX-H100", "dgx a100": "DGX-A100",
                   "dgxa100": "DGX-A100", "dgx b200": "DGX-B200", "dgxb200": "DGX-B200"}

#: Read-only view of the system registry.
SYSTEMS: Mapping[str, SystemSpec] = MappingProxyType(_SYSTEMS)


def systems() -> list[str]:
    """The system names the registry knows, oldest first."""
    return list(_SYSTEMS)


def system(name: str) -> SystemSpec:
    """The spec of system ``name``, e.g. ``"DGX-H100"`` (``"DGX H100"``, any case, too)."""
    return _lookup(_SYSTEMS, _SYSTEM_ALIASES, name, "system")
