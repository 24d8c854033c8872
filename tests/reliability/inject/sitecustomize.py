"""Fault injection for a real ferrymand (reliability row 8): put this directory on PYTHONPATH
and set FERRYMAN_TEST_CORRUPT_WRITE=FILE. While FILE exists, the copier flips one byte of
the data it writes at the offset FILE names, once; then FILE is removed. The daemon, the
writer and the store are otherwise untouched: a copier bug, made on purpose."""

from __future__ import annotations

import os
from pathlib import Path

_flag = os.environ.get("FERRYMAN_TEST_CORRUPT_WRITE")

if _flag:
    from appliance.datapath import copier as _copier

    _original = _copier.Copier._submit_write

    def _submit_write(self, r, *, zero):  # type: ignore[no-untyped-def]
        flag = Path(_flag)
        if not zero and r.buf is not None and flag.exists():
            at = int(flag.read_text())
            if r.offset <= at < r.offset + r.length:
                data = bytearray(r.buf.to_bytearray())
                data[at - r.offset] ^= 0x5A
                r.buf = _copier.nbd.Buffer.from_bytearray(data)
                flag.unlink()
        return _original(self, r, zero=zero)

    _copier.Copier._submit_write = _submit_write
