"""Write an empty Windows registry hive (one root key, one security cell).

hivexregedit can only merge into an existing hive and Debian ships none (libguestfs builds
its phony Windows guest from a binary "minimal-hive" kept in its source tree), so this module
writes one from the format as hivex reads it (hivex-internal.h): a 4 KiB "regf" header, one
4 KiB "hbin" page holding the root "nk" cell, the "sk" cell it points to, and a free cell.
The timestamp is fixed so that the bytes, and the image built from them, are reproducible.
"""

from __future__ import annotations

import struct
import sys

PAGE = 0x1000
TIMESTAMP = 132_000_000_000_000_000  # 100 ns since 1601 (2019-04-16); fixed for reproducibility
NONE = 0xFFFFFFFF


def _cell(payload: bytes) -> bytes:
    size = (4 + len(payload) + 7) & ~7
    return struct.pack("<i", -size) + payload + b"\0" * (size - 4 - len(payload))


def minimal_hive(root_name: str = "ROOT") -> bytes:
    name = root_name.encode("ascii")
    nk_off = 0x20
    nk_len = (4 + 76 + len(name) + 7) & ~7
    sk_off = nk_off + nk_len
    nk = (
        struct.pack(
            "<2sHQIIIIIIIIIIHHIIIIHH",
            b"nk",
            0x2C,  # KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME, as Windows writes a root key
            TIMESTAMP,
            0,
            NONE,  # parent
            0,
            0,
            NONE,
            NONE,
            0,
            NONE,
            sk_off,
            NONE,
            0,
            0,
            0,
            0,
            0,
            0,
            len(name),
            0,
        )
        + name
    )
    # Self-relative security descriptor without owner, group or ACLs (20 bytes).
    sd = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)
    sk = struct.pack("<2sHIIII", b"sk", 0, sk_off, sk_off, 1, len(sd)) + sd
    cells = _cell(nk) + _cell(sk)
    free = PAGE - 0x20 - len(cells)
    hbin_hdr = struct.pack("<4sII", b"hbin", 0, PAGE) + struct.pack("<Q", TIMESTAMP) + b"\0" * 12
    page = hbin_hdr + cells + struct.pack("<i", free) + b"\0" * (free - 4)
    assert len(page) == PAGE

    hdr = bytearray(PAGE)
    struct.pack_into("<4sIIQIIIIII", hdr, 0, b"regf", 1, 1, TIMESTAMP, 1, 3, 0, 1, nk_off, PAGE)
    struct.pack_into("<I", hdr, 44, 1)
    hdr[48 : 48 + 64] = "minimal".encode("utf-16-le").ljust(64, b"\0")
    csum = 0
    for (word,) in struct.iter_unpack("<I", bytes(hdr[:0x1FC])):
        csum ^= word
    struct.pack_into("<I", hdr, 0x1FC, csum)
    return bytes(hdr) + page


def minimal_pe64() -> bytes:
    """A 1 KiB PE32+ x86-64 console executable header: what libguestfs reads to tell the
    architecture of a Windows guest (it runs `file` on System32/cmd.exe). It never runs."""
    img = bytearray(1024)
    img[0:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, 0x80)  # e_lfanew
    img[0x80:0x84] = b"PE\0\0"
    # COFF header: machine AMD64, 1 section, optional header 240 bytes, executable image.
    struct.pack_into("<HHIIIHH", img, 0x84, 0x8664, 1, 0, 0, 0, 240, 0x0022)
    opt = 0x98
    struct.pack_into("<HBB", img, opt, 0x20B, 14, 0)  # PE32+ magic, linker version
    struct.pack_into("<I", img, opt + 16, 0x1000)  # AddressOfEntryPoint
    struct.pack_into("<Q", img, opt + 24, 0x140000000)  # ImageBase
    struct.pack_into("<II", img, opt + 32, 0x1000, 0x200)  # section, file alignment
    struct.pack_into("<HH", img, opt + 40, 6, 0)  # OS version
    struct.pack_into("<HH", img, opt + 48, 6, 0)  # subsystem version
    struct.pack_into("<II", img, opt + 56, 0x2000, 0x200)  # SizeOfImage, SizeOfHeaders
    struct.pack_into("<HH", img, opt + 68, 3, 0x8160)  # subsystem console, DLL characteristics
    struct.pack_into("<I", img, opt + 108, 16)  # NumberOfRvaAndSizes
    sec = opt + 240
    struct.pack_into("<8sIIIII", img, sec, b".text", 0x10, 0x1000, 0x200, 0x200, 0)
    struct.pack_into("<I", img, sec + 36, 0x60000020)  # code, execute, read
    img[0x200] = 0xC3  # ret
    return bytes(img)


if __name__ == "__main__":
    sys.stdout.buffer.write(minimal_hive())
