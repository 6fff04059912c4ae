"""The hardware registry against its datasheets, and its interface."""
import re

import pytest

from utils import hardware as hw

REQUIRED = ["H100-SXM", "H200", "A100-SXM-80GB", "A100-SXM-40GB", "L4", "MI300X", "B200",
            "RTX-4090"]

# Figures as the datasheets print them: NVIDIA prints the 2:4 sparsity figure for
# tensor cores, so the dense figure in the registry must be half of it.
SPARSE_DATASHEET_TFLOPS = {
    ("H100-SXM", "bf16"): 1979, ("H100-SXM", "fp8"): 3958, ("H100-SXM", "tf32"): 989,
    ("H200", "fp8"): 3958,
    ("A100-SXM-80GB", "bf16"): 624, ("A100-SXM-80GB", "tf32"): 312,
    ("A100-SXM-80GB", "int8"): 1248,
    ("L4", "fp16"): 242, ("L4", "fp8"): 485, ("L4", "tf32"): 120,
    ("B200", "bf16"): 4500, ("B200", "fp8"): 9000,
    ("MI300X", "fp16"): 2614.9, ("MI300X", "fp8"): 5229.8,
}


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_gpu_is_complete(name):
    s = hw.get(name)
    assert s.name == name
    for dtype in ("fp32", "bf16", "fp16"):
        assert s.peak_flops[dtype] > 1e12
    assert s.memory_bytes >= 24 * 2**30
    assert s.memory_bandwidth >= 300e9
    assert s.tdp_watts > 0 and s.compute_units > 0 and s.link_bandwidth > 0
    assert s.l2_bytes is None or s.l2_bytes >= 32 * 2**20
    assert re.search(r"(19|20)\d\d", s.source), "source must carry a date"


@pytest.mark.parametrize("key,sparse", sorted(SPARSE_DATASHEET_TFLOPS.items()))
def test_dense_figures_are_half_the_sparse_datasheet_figure(key, sparse):
    name, dtype = key
    assert hw.get(name).peak_flops[dtype] == pytest.approx(sparse * 1e12 / 2, rel=2e-3)


def test_memory_and_bandwidth_from_datasheets():
    # capacities are binary: five 16 GiB HBM3 stacks on H100, eight 24 GiB on MI300X
    assert hw.get("H100-SXM").memory_bytes == 5 * 16 * 2**30
    assert hw.get("MI300X").memory_bytes == 8 * 24 * 2**30
    assert hw.get("H100-SXM").memory_bandwidth == 3.35e12
    assert hw.get("H200").memory_bandwidth == 4.8e12
    assert hw.get("A100-SXM-80GB").memory_bandwidth == 2.039e12
    assert hw.get("A100-SXM-40GB").memory_bandwidth == 1.555e12
    # GDDR6X: 384-bit bus x 21 Gbit/s per pin / 8 bits per byte
    assert hw.get("RTX-4090").memory_bandwidth == pytest.approx(384 * 21e9 / 8)
    assert hw.get("B200").memory_bandwidth == 8e12


def test_nvlink_is_stored_per_direction():
    # NVIDIA quotes the bidirectional total: 900 GB/s on H100, 600 on A100, 1.8 TB/s on B200
    assert hw.get("H100-SXM").link_bandwidth * 2 == 900e9
    assert hw.get("A100-SXM-80GB").link_bandwidth * 2 == 600e9
    assert hw.get("B200").link_bandwidth * 2 == 1.8e12
    assert hw.link("NVLink 4").bandwidth == hw.get("H100-SXM").link_bandwidth


def test_links():
    # PCIe Gen4: 16 GT/s x 16 lanes x 128/130 / 8 = 31.5 GB/s per direction
    assert hw.link("PCIe Gen4 x16").bandwidth == pytest.approx(31.5e9, rel=1e-3)
    assert hw.link("PCIe Gen5 x16").bandwidth == pytest.approx(63.0e9, rel=1e-3)
    assert hw.link("PCIe Gen3 x16").bandwidth == pytest.approx(15.75e9, rel=1e-3)
    assert hw.link("InfiniBand NDR").bandwidth == 50e9
    assert hw.link("InfiniBand HDR").bandwidth == 25e9
    assert hw.link("InfiniBand XDR").bandwidth == 100e9
    assert hw.link("Ethernet 400G").bandwidth == 50e9
    for spec in hw.LINKS.values():
        assert spec.source


def test_ridge_point():
    h100 = hw.get("H100-SXM")
    assert hw.ridge_point(h100, "bf16") == pytest.approx(989.5e12 / 3.35e12)
    assert hw.ridge_point("A100-SXM-80GB", "fp16") == pytest.approx(312e12 / 2.039e12)
    # more bandwidth, same compute: H200's ridge is lower than H100's
    assert hw.ridge_point("H200", "bf16") < hw.ridge_point("H100-SXM", "bf16")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="H100-SXM.*MI300X"):
        hw.get("H900")
    with pytest.raises(KeyError, match="PCIe Gen4 x16"):
        hw.link("PCIe Gen9")
    with pytest.raises(TypeError, match="string"):
        hw.get(100)
    with pytest.raises(KeyError, match="no published dense peak.*fp8"):
        hw.ridge_point("A100-SXM-80GB", "fp8")


def test_lookup_is_forgiving_about_case_and_aliases():
    assert hw.get("h100-sxm") is hw.get("H100-SXM")
    assert hw.get("H100") is hw.get("H100-SXM")


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        hw.get("H100-SXM").peak_flops["bf16"] = 1.0
    with pytest.raises(Exception):
        hw.get("H100-SXM").memory_bytes = 1


def test_attainable_flops():
    assert hw.attainable_flops(1.0, 100.0, 10.0) == 10.0
    assert hw.attainable_flops(1e6, 100.0, 10.0) == 100.0
    with pytest.raises(ValueError, match="intensity"):
        hw.attainable_flops(-1, 100.0, 10.0)


# On-chip memory per SM, as the CUDA Programming Guide's compute-capability table gives it
# (maximum shared memory per SM: 8.0 164 KB, 8.9 100 KB, 9.0 and 10.0 228 KB, KB = 1024 B;
# 64K 32-bit registers per SM) and AMD's ROCm specification table for MI300X (LDS 64 KiB,
# VGPR file 512 KiB per CU).
SMEM_KIB = {"H100-SXM": 228, "H200": 228, "B200": 228, "A100-SXM-80GB": 164,
            "A100-SXM-40GB": 164, "L4": 100, "RTX-4090": 100, "MI300X": 64}
SMS = {"H100-SXM": 132, "H200": 132, "A100-SXM-80GB": 108, "A100-SXM-40GB": 108, "L4": 58,
       "RTX-4090": 128, "MI300X": 304, "B200": 148}


@pytest.mark.parametrize("name", REQUIRED)
def test_on_chip_memory_per_sm(name):
    g = hw.get(name)
    assert g.sm_count == SMS[name] == g.compute_units
    assert g.smem_per_sm == SMEM_KIB[name] * 1024
    assert g.register_file_per_sm == (512 if name == "MI300X" else 256) * 1024
    assert str(SMEM_KIB[name]) in g.sm_source
    # the whole chip holds megabytes of registers: 14.5 MiB on L4, 152 MiB on MI300X
    total_regs = g.sm_count * g.register_file_per_sm
    assert 14 * 2**20 < total_regs < 160 * 2**20


# ---- the system registry (chapter 07): figures as NVIDIA's documents print them
SYSTEM_FIGURES = {
    # name: (gpus, GPU memory "GB", NVSwitch chips, compute NICs, NIC Gb/s, CPU cores, kW max, U)
    "DGX-A100": (8, 640, 6, 8, 200, 128, 6.5, 6),
    "DGX-H100": (8, 640, 4, 8, 400, 112, 10.2, 8),
    "DGX-B200": (8, 1440, 2, 8, 400, 112, 14.3, 10),
}


@pytest.mark.parametrize("name", sorted(SYSTEM_FIGURES))
def test_systems_against_their_documents(name):
    gpus, mem_gb, nvs, nics, gbps, cores, kw, units = SYSTEM_FIGURES[name]
    s = hw.system(name)
    assert (s.gpus, s.nvswitches, s.compute_nics, s.cpu_cores, s.rack_units) == \
        (gpus, nvs, nics, cores, units)
    assert s.gpu_memory_bytes == mem_gb * 2**30            # the registry's GB-as-GiB convention
    assert s.gpu_memory_bytes == s.gpus * s.gpu_spec.memory_bytes
    assert s.nic_bandwidth == gbps * 1e9 / 8
    assert s.network_bandwidth == nics * gbps * 1e9 / 8
    assert s.max_power_watts == kw * 1000
    assert s.system_memory_bytes == 2 * 2**40
    assert s.nvlink_bandwidth == s.gpu_spec.link_bandwidth
    assert s.source and "NVIDIA" in s.source and f"{kw:g} kW" in s.source


def test_system_lookup_and_errors():
    assert hw.systems() == ["DGX-A100", "DGX-H100", "DGX-B200"]
    assert hw.system("dgx h100") is hw.system("DGX-H100") is hw.SYSTEMS["DGX-H100"]
    assert hw.system("DGXB200").name == "DGX-B200"
    with pytest.raises(KeyError, match="unknown system name 'DGX-Z'.*DGX-H100"):
        hw.system("DGX-Z")
    with pytest.raises(ValueError):
        hw.system("HGX-H100")
    with pytest.raises(TypeError):
        hw.system(100)
    with pytest.raises(TypeError):
        hw.SYSTEMS["X"] = hw.SYSTEMS["DGX-H100"]
