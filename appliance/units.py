"""Byte units. Sizes in the engine are always plain ints of bytes."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'. For messages and tables, never for arithmetic."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
