"""What the studio knows about GPUs: architecture from compute capability, peak memory bandwidth by name.

Data, not prose: the Quantize page's per-GPU advice and the Monitor's bandwidth meter both read this
one table, so a new GPU is one row here. Peak bandwidths are the vendors' datasheet figures (HBM/GDDR
peak, not a measured copy speed); a GPU not in the table says so rather than guessing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# compute capability (major, minor) -> architecture family, as NVIDIA names them
_ARCH = (
    ((7, 0), "volta"), ((7, 2), "volta"), ((7, 5), "turing"),
    ((8, 0), "ampere"), ((8, 6), "ampere"), ((8, 7), "ampere"), ((8, 9), "ada"),
    ((9, 0), "hopper"), ((10, 0), "blackwell"), ((10, 3), "blackwell"), ((12, 0), "blackwell"),
    ((12, 1), "blackwell"),
)

# (pattern on the lower-cased device name, peak memory bandwidth in TB/s, datasheet row).
# Order matters: the first match wins, so the more specific names come first.
PEAK_BANDWIDTH: tuple[tuple[str, float, str], ...] = (
    (r"(?<!g)h200", 4.8, "H200 SXM 141 GB"),     # not "GH200", which has its own row
    (r"h100.*(nvl)", 3.9, "H100 NVL"),
    (r"h100.*(pcie)", 2.0, "H100 PCIe"),
    (r"h100", 3.35, "H100 SXM"),
    (r"h800", 3.35, "H800 SXM"),
    (r"gh200", 4.9, "GH200 (HBM3e)"),
    (r"b200", 8.0, "B200"),
    (r"a100.*80\s*gb.*pcie|a100.*pcie.*80\s*gb", 1.935, "A100 80GB PCIe"),
    (r"a100.*80\s*gb", 2.039, "A100 80GB SXM"),
    (r"a100", 1.555, "A100 40GB"),
    (r"a800", 2.039, "A800 80GB"),
    (r"l40s", 0.864, "L40S"),
    (r"l40", 0.864, "L40"),
    (r"l4\b", 0.3, "L4"),
    (r"a10g", 0.6, "A10G"),
    (r"a10\b", 0.6, "A10"),
    (r"rtx 6000 ada", 0.96, "RTX 6000 Ada"),
    (r"5090", 1.792, "GeForce RTX 5090"),
    (r"4090", 1.008, "GeForce RTX 4090"),
    (r"3090 ti", 1.008, "GeForce RTX 3090 Ti"),
    (r"3090", 0.936, "GeForce RTX 3090"),
    (r"v100", 0.9, "V100"),
    (r"t4\b", 0.32, "T4"),
)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU as the studio sees it.

    ``arch``: "volta", "turing", "ampere", "ada", "hopper", "blackwell", or "unknown" (no capability
    given, or one newer than this table). ``peak_bandwidth_tbs``: datasheet peak memory bandwidth in
    TB/s (10**12 bytes/s), None when the name is not in the table. ``source``: the datasheet row used.
    """
    name: str
    arch: str
    capability: tuple[int, int] | None
    peak_bandwidth_tbs: float | None
    source: str | None = None


def arch_of(capability: tuple[int, int] | None) -> str:
    """Architecture family of a compute capability; "unknown" when None or not in the table."""
    if capability is None:
        return "unknown"
    for cap, arch in _ARCH:
        if tuple(capability) == cap:
            return arch
    major = capability[0]
    return {7: "volta", 8: "ampere", 9: "hopper", 10: "blackwell", 12: "blackwell"}.get(major, "unknown")


def gpu_spec(name: str, capability: tuple[int, int] | None = None) -> GpuSpec:
    """The spec of a GPU from its device name (``torch.cuda.get_device_name`` or NVML) and compute
    capability (``torch.cuda.get_device_capability``)."""
    low = (name or "").lower()
    for pattern, tbs, row in PEAK_BANDWIDTH:
        if re.search(pattern, low):
            return GpuSpec(name, arch_of(capability), capability, tbs, row)
    return GpuSpec(name, arch_of(capability), capability, None, None)


def local_gpus() -> list[GpuSpec]:
    """The GPUs torch sees here, [] without CUDA (torch imported lazily: pages never import it)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        return [gpu_spec(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here, not a crash of the page
        return []


__all__ = ["GpuSpec", "PEAK_BANDWIDTH", "arch_of", "gpu_spec", "local_gpus"]
