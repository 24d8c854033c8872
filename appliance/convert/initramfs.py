"""List the files inside an initramfs image (what `lsinitramfs` does, for every layout).

An initramfs is one or more concatenated cpio archives: uncompressed ones first (early
microcode, as both initramfs-tools and dracut write it), then one compressed archive running to
the end of the file. Used to tell whether a kernel's initramfs holds the virtio drivers.

The image comes from an untrusted guest, so decompression runs in a child process with a
deadline and the listing stops at a size limit.
"""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

from appliance.convert.errors import InspectError

MAX_DECOMPRESSED = 2 * 1024**3  # bytes; real initramfs images stay far below
DECOMPRESS_TIMEOUT = 60.0  # seconds
NEWC = (b"070701", b"070702")
COMPRESSORS = (
    (b"\x1f\x8b", ["gzip", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]),
    (b"\xfd7zXZ", ["xz", "-dc"]),
    (b"\x5d\x00\x00", ["xz", "--format=lzma", "-dc"]),
    (b"BZh", ["bzip2", "-dc"]),
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x89LZO", ["lzop", "-dc"]),
)


def _parse_newc(data: bytes, pos: int, names: list[str]) -> int:
    """Parse one newc archive from ``pos``; return the offset after its trailer."""
    while pos + 110 <= len(data):
        if data[pos : pos + 6] not in NEWC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        hdr = data[pos : pos + 110]
        namesize = int(hdr[94:102], 16)
        filesize = int(hdr[54:62], 16)
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode("utf-8", errors="replace")
        pos = (name_start + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return pos
        names.append(name)
    return len(data)


def list_files(data: bytes) -> list[str]:
    names: list[str] = []
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:
            pos += 1  # padding between archives
        if pos >= len(data):
            break
        head = data[pos : pos + 6]
        if head in NEWC:
            pos = _parse_newc(data, pos, names)
            continue
        if data[pos:].startswith(b"\x1f\x8b"):
            # gzip in-process: a zlib stream tells where it ends, so the archives appended
            # after it (Ferryman's virtio cpio) are listed too.
            d = zlib.decompressobj(wbits=31)
            try:
                out = d.decompress(data[pos:], MAX_DECOMPRESSED)
            except zlib.error as e:
                raise ValueError(f"bad gzip segment at offset {pos}: {e}") from e
            _parse_all(out, names)
            pos = len(data) - len(d.unused_data)
            continue
        for magic, cmd in COMPRESSORS:
            if data[pos:].startswith(magic):
                try:
                    r = subprocess.run(
                        cmd,
                        input=data[pos:],
                        capture_output=True,
                        timeout=DECOMPRESS_TIMEOUT,
                        check=False,
                    )
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise InspectError(
                        f"cannot decompress the initramfs with {cmd[0]}: {e}",
                        hint=f"install {cmd[0]} on the appliance",
                    ) from e
                _parse_all(r.stdout[:MAX_DECOMPRESSED], names)
                # The tool stops at the end of its stream; a gzip archive appended after it
                # (4-byte aligned, zero padded, as Ferryman appends) is found by its header.
                nxt = data.find(b"\x1f\x8b\x08", pos + len(magic))
                while nxt > 0 and (nxt % 4 or data[nxt - 1] != 0):
                    nxt = data.find(b"\x1f\x8b\x08", nxt + 1)
                if nxt > 0:
                    pos = nxt
                    break
                return names
        else:
            raise ValueError(f"unknown initramfs segment at offset {pos}: {head!r}")
    return names


def _parse_all(out: bytes, names: list[str]) -> None:
    """Consecutive archives of one decompressed stream."""
    inner = 0
    while inner < len(out):
        while inner < len(out) and out[inner] == 0:
            inner += 1
        if inner >= len(out) or out[inner : inner + 6] not in NEWC:
            break
        inner = _parse_newc(out, inner, names)


def list_file(path: Path) -> list[str]:
    return list_files(path.read_bytes())


def virtio_in(names: list[str]) -> list[str]:
    """Names of the virtio driver modules present in a file listing."""
    found = set()
    for n in names:
        base = n.rsplit("/", 1)[-1]
        mod = base.split(".ko", 1)[0] if ".ko" in base else None
        if mod and mod.replace("-", "_").startswith("virtio"):
            found.add(mod.replace("-", "_"))
    return sorted(found)
