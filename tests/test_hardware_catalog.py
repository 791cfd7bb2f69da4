"""The hardware catalog: shipped as package data, every figure sourced, lookups forgiving, errors helpful."""

import pytest
import yaml

from labkit.hardware import HardwareLookupError, catalog, gpu, network, networks, normalize_dtype
from labkit.hardware.catalog import CATALOG_FILE, match_device

REQUIRED = ["V100", "A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L40S", "MI250X", "MI300X", "CPU"]


def test_catalog_is_package_data_listed_in_pyproject():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["labkit"]
    assert "hardware/*.yaml" in patterns, f"add 'hardware/*.yaml' to package-data; have {patterns}"
    assert CATALOG_FILE.parent.name == "hardware" and CATALOG_FILE.suffix == ".yaml"


@pytest.mark.parametrize("name", REQUIRED)
def test_required_accelerators_are_present(name):
    acc = gpu(name)
    assert acc.memory_GB > 0 and acc.memory_bw_GBs > 0 and acc.tdp_W > 0 and acc.pcie_gen >= 3
    assert acc.peak_flops("fp32") > 0
    assert acc.source and len(acc.source) > 10


def test_every_entry_names_its_source_and_known_dtypes():
    raw = yaml.safe_load(CATALOG_FILE.read_text())
    for entry in raw["accelerators"] + raw["networks"]:
        assert entry.get("source"), f"{entry['name']} has no source"
    for acc in catalog():
        assert set(acc.peak_tflops) <= {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8"}, acc.name


def test_lookup_ignores_case_and_punctuation():
    assert gpu("A100-80GB") is gpu("a100 80gb") is gpu("A100_SXM4_80GB")
    assert gpu("H100-SXM").name == "H100-SXM5-80GB"
    assert gpu("h100 pcie").name == "H100-PCIe-80GB"
    assert gpu("A100-40GB").memory_GB == 40 and gpu("A100-80GB").memory_GB == 80
    assert network("ndr").bandwidth_Gbps == 400 and network("IB-HDR-200").bandwidth == 25e9


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(HardwareLookupError) as err:
        gpu("B200")
    msg = str(err.value)
    assert "B200" in msg and "H100-SXM5-80GB" in msg and "MI300X" in msg
    with pytest.raises(HardwareLookupError, match="IB-NDR-400"):
        network("omnipath")
    with pytest.raises(HardwareLookupError, match="fp16"):
        gpu("V100").peak_flops("bf16")          # V100 has no bf16 tensor cores
    with pytest.raises(HardwareLookupError, match="valid dtypes"):
        normalize_dtype("int4")


def test_dense_not_sparse_and_generations_ordered():
    # dense bf16 is twice dense tf32 and half of fp8 on Hopper; sparse figures (1979 bf16) must not appear
    h100 = gpu("H100-SXM")
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.peak_flops("fp8") == pytest.approx(2 * h100.peak_flops("bf16"), rel=1e-3)
    assert h100.peak_flops("tf32") == pytest.approx(h100.peak_flops("bf16") / 2, rel=1e-3)
    assert gpu("A100").peak_flops("bf16") == 312e12
    v, a, h = (gpu(n).peak_flops("auto") for n in ("V100", "A100", "H100"))
    assert v < a < h
    assert gpu("H200").memory_GB > gpu("H100").memory_GB and gpu("H200").memory_bw > gpu("H100").memory_bw
    assert "fp8" not in gpu("A100").dtypes and "fp8" in gpu("MI300X").dtypes


def test_dtype_aliases_and_roofline_ridge():
    import torch

    assert normalize_dtype(torch.bfloat16) == "bf16" and normalize_dtype("float32") == "fp32"
    a100 = gpu("A100-80GB")
    assert a100.training_dtype == "bf16" and gpu("V100").training_dtype == "fp16"
    assert a100.ridge_point("bf16") == pytest.approx(312e12 / 2039e9)
    assert a100.link_bw == 300e9                # per direction: half of NVLink's 600 GB/s total
    assert gpu("L40S").link_bw == 32e9          # no NVLink: PCIe Gen4 x16, per direction
    assert len(networks()) >= 5 and {n.kind for n in networks()} >= {"InfiniBand", "Ethernet/RoCE v2"}


def test_match_device_names_torch_reports():
    assert match_device("NVIDIA H100 80GB HBM3").name == "H100-SXM5-80GB"
    assert match_device("NVIDIA H100 PCIe", 80e9).name == "H100-PCIe-80GB"
    assert match_device("NVIDIA A100-SXM4-40GB", 40 * 2**30).name == "A100-SXM4-40GB"
    assert match_device("NVIDIA A100-SXM4-80GB", 80 * 2**30).name == "A100-SXM4-80GB"
    assert match_device("NVIDIA H200", 141e9).name == "H200-SXM-141GB"
    assert match_device("AMD Instinct MI300X").name == "MI300X"
    assert match_device("Tesla V100-SXM2-32GB").name == "V100-SXM2-32GB"
    assert match_device("NVIDIA GeForce RTX 4090") is None


@pytest.mark.parametrize("spelling, name", [
    ("H100-SXM5", "H100-SXM5-80GB"),            # a unique prefix of a catalog name
    ("a100 80gb sxm", "A100-SXM4-80GB"),        # contains an alias (A100-80GB), words in another order
    ("A100 40GB SXM", "A100-SXM4-40GB"),        # the longest contained alias wins over the shorter "A100"
    ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),     # "H100 PCIe" beats "H100" (an alias of the SXM part)
    ("h200 141gb", "H200-SXM-141GB"),
    ("Ethernet 25GbE", "Ethernet-25GbE-TCP"),
])
def test_lookup_accepts_prefixes_and_longer_names(spelling, name):
    finder = network if "ethernet" in spelling.lower() else gpu
    assert finder(spelling).name == name


@pytest.mark.parametrize("spelling, candidates", [
    ("A100-SXM", ["A100-SXM4-40GB", "A100-SXM4-80GB"]),      # a prefix of two entries
    ("a100 sxm4", ["A100-SXM4-40GB", "A100-SXM4-80GB"]),
    ("mi", None), ("", None), ("B300 SXM", None),              # too short to guess / unknown
])
def test_ambiguous_or_unknown_lookups_say_which_and_list_valid(spelling, candidates):
    with pytest.raises(HardwareLookupError) as err:
        gpu(spelling)
    msg = str(err.value)
    assert "valid names: " in msg.lower() and "MI300X" in msg and "CPU-node" in msg
    if candidates:
        head = msg.split("Valid names")[0]
        assert "ambiguous" in head and all(c in head for c in candidates)
        assert "H100" not in head
    else:
        assert msg.startswith("unknown accelerator")


def test_a_contained_name_with_a_different_number_left_over_is_not_taken():
    """'Tesla V100-SXM2-16GB' holds the V100's name, but the catalog only has the 32 GB part: an error
    listing the valid names, not a silently wrong memory size."""
    with pytest.raises(KeyError, match="unknown accelerator 'Tesla V100-SXM2-16GB'; valid names"):
        gpu("Tesla V100-SXM2-16GB")
    assert gpu("NVIDIA H100 PCIe").name == "H100-PCIe-80GB"
