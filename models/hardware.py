"""What this machine's CPU can do, read at run time (never assumed)."""
from __future__ import annotations


def cpu_bf16_support() -> bool:
    """True when this CPU does bf16 arithmetic natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo's
    flags).  Without it torch emulates bf16, slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
