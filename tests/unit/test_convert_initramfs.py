"""The initramfs lister on synthetic images of every layout the converter meets."""

from __future__ import annotations

import gzip
import lzma

from appliance.convert import initramfs


def newc(files: dict[str, bytes]) -> bytes:
    out = b""
    for ino, (name, data) in enumerate([*files.items(), ("TRAILER!!!", b"")], 1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08X}" for v in (ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out += hdr.encode() + nb
        out += b"\0" * ((4 - len(out) % 4) % 4) + data
        out += b"\0" * ((4 - len(out) % 4) % 4)
    return out + b"\0" * ((512 - len(out) % 512) % 512)


EARLY = newc({"kernel/x86/microcode/GenuineIntel.bin": b"ucode"})
MAIN = newc(
    {
        "init": b"#!/bin/sh\n",
        "usr/lib/modules/6.1.0/kernel/drivers/ata/ahci.ko": b"ko",
        "conf/modules": b"ahci\n",
    }
)
ADDED = newc(
    {
        "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko": b"ko",
        "usr/lib/modules/6.1.0/kernel/drivers/virtio/virtio_pci.ko": b"ko",
    }
)


def test_early_cpio_then_gzip_then_appended_gzip() -> None:
    img = EARLY + gzip.compress(MAIN) + b"\0" * 4 + gzip.compress(ADDED)
    names = initramfs.list_files(img)
    assert "kernel/x86/microcode/GenuineIntel.bin" in names
    assert "conf/modules" in names
    assert initramfs.virtio_in(names) == ["virtio_blk", "virtio_pci"]


def test_without_appended_archive_no_virtio() -> None:
    names = initramfs.list_files(EARLY + gzip.compress(MAIN))
    assert "init" in names and initramfs.virtio_in(names) == []


def test_xz_main_archive_then_appended_gzip() -> None:
    main = lzma.compress(MAIN, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    img = main + b"\0" * (4 + (4 - len(main) % 4) % 4)
    img += gzip.compress(ADDED)
    names = initramfs.list_files(img)
    assert "init" in names
    assert initramfs.virtio_in(names) == ["virtio_blk", "virtio_pci"]
