"""Seed keys and sealing: what the media carries is bound to its key, seed and place."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from appliance import seeding
from appliance.units import MiB


def test_keygen_writes_a_private_hex_key_once(tmp_path: Path) -> None:
    p = seeding.keygen(tmp_path / "k")
    assert p.stat().st_mode & 0o777 == 0o600
    key = seeding.derive_key({"kind": "key-file"}, str(p), None)
    assert len(key) == 32 and bytes.fromhex(p.read_text().strip()) == key
    with pytest.raises(seeding.SeedError, match="already exists"):
        seeding.keygen(p)


def test_key_file_forms_and_refusals(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(bytes(range(32)))
    assert seeding.derive_key({"kind": "key-file"}, str(raw), None) == bytes(range(32))
    short = tmp_path / "short"
    short.write_text("secret\n")
    with pytest.raises(seeding.SeedError, match=r"does not hold a key \(7 bytes"):
        seeding.derive_key({"kind": "key-file"}, str(short), None)
    with pytest.raises(seeding.SeedError, match="made with a passphrase"):
        seeding.derive_key(seeding.new_kdf(None, "x"), str(raw), None)
    with pytest.raises(seeding.SeedError, match="cannot read the key file"):
        seeding.derive_key({"kind": "key-file"}, str(tmp_path / "absent"), None)


def test_passphrase_goes_through_scrypt_with_the_seed_salt(tmp_path: Path) -> None:
    pf = tmp_path / "pass"
    pf.write_text("correct horse battery staple\nignored second line\n")
    kdf = seeding.new_kdf(None, str(pf))
    assert kdf["kind"] == "scrypt" and "staple" not in str(kdf)
    k1 = seeding.derive_key(kdf, None, str(pf))
    assert k1 == seeding.derive_key(kdf, None, str(pf))
    assert k1 != seeding.derive_key(seeding.new_kdf(None, str(pf)), None, str(pf))  # new salt
    pf.write_text("short\n")
    with pytest.raises(seeding.SeedError, match="has 5 characters"):
        seeding.derive_key(kdf, None, str(pf))


def test_a_chunk_opens_only_at_its_place_in_its_seed() -> None:
    key = bytes(32)
    s = seeding.Sealer(key, "seed-a")
    place = seeding.chunk_place("vda", 3, 3 * MiB, MiB)
    blob = s.seal(b"data" * 100, place)
    assert s.open(blob, place) == b"data" * 100
    with pytest.raises(InvalidTag):  # moved to another offset
        s.open(blob, seeding.chunk_place("vda", 4, 4 * MiB, MiB))
    with pytest.raises(InvalidTag):  # copied into another seed
        seeding.Sealer(key, "seed-b").open(blob, place)
    flipped = bytearray(blob)
    flipped[20] ^= 1
    with pytest.raises(InvalidTag):
        s.open(bytes(flipped), place)


def test_manifest_of_a_seed_matches_hashes_of_zero_and_data_blocks() -> None:
    data_hash = hashlib.sha256(b"\x01" * MiB).hexdigest()
    recs = [
        {"offset": 0, "length": 2 * MiB, "zero": True},
        {"offset": 2 * MiB, "length": MiB + 512, "zero": False, "blocks": [data_hash, "00" * 32]},
    ]
    man = seeding.manifest_of(3 * MiB + 512, recs)
    assert man.hashes[0] == hashlib.sha256(bytes(MiB)).digest()
    assert man.hashes[2].hex() == data_hash and man.complete()
    with pytest.raises(seeding.SeedError, match="not a whole number of MiB"):
        seeding.check_chunk_size(MiB + 1)
