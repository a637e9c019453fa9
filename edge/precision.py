"""Which arithmetic a CPU-side computation runs in: float32, bfloat16, or "auto" (bf16 where it is native).

Used by the backbone (`model.backbone_precision`) and PatchCore's search (`model.patchcore.search_precision`).
"""

from __future__ import annotations

import torch

PRECISIONS = ("float32", "bfloat16", "auto")


def native_bfloat16_matmul() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls and convolutions run natively (elsewhere
    bf16 is emulated and slower than float32)."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # private API: a torch without it gets the safe answer
        return False


def resolve_precision(precision: str, field: str) -> str:
    """The arithmetic `precision` means on this machine's CPU; `field` names the setting in the error."""
    if precision not in PRECISIONS:
        raise ValueError(f"{field} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16_matmul() else "float32"
    return precision


def bfloat16_on(configured: str, resolved: str, device: torch.device) -> bool:
    """Whether to compute in bf16 on `device`: "auto" means bf16 only on a CPU that has it natively (a GPU
    gets float32, and TensorRT's FP16 does reduced precision its own way); "bfloat16" means everywhere.
    Static per device, so export and compile see one branch."""
    return resolved == "bfloat16" and (device.type == "cpu" or configured == "bfloat16")
