"""Credentials at rest: encrypted in the store with a key only root can read.

The key is a root-only file beside the store (0600 in a 0700 directory), created on first
use. A store backup alone therefore holds no usable secret; the key file must be backed up
separately, on purpose. Secrets are handed to helpers by 0600 file or fd, never in argv.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlite_utils import Database

from appliance.errors import StoreError
from store.db import now

KEY_NAME = "secret.key"


class Vault:
    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._fernet: Fernet | None = None

    def _key(self) -> Fernet:
        if self._fernet is None:
            if not self.key_path.exists():
                self.key_path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(Fernet.generate_key())
                    f.flush()
                    os.fsync(f.fileno())
            st = self.key_path.stat()
            if st.st_mode & 0o077:
                raise StoreError(
                    f"the secret key {self.key_path} is readable by others",
                    hint=f"chmod 600 {self.key_path}",
                )
            self._fernet = Fernet(self.key_path.read_bytes().strip())
        return self._fernet

    def put(self, db: Database, label: str, username: str, secret: str) -> int:
        token = self._key().encrypt(secret.encode())
        cur = db.execute(
            "INSERT INTO credentials (label, username, secret, created_at) VALUES (?,?,?,?)",
            [label, username, token, now()],
        )
        return int(cur.lastrowid or 0)

    def get(self, db: Database, cred_id: int) -> tuple[str, str]:
        row = db.execute(
            "SELECT username, secret, label FROM credentials WHERE id=?", [cred_id]
        ).fetchone()
        if row is None:
            raise StoreError(
                f"credential {cred_id} is missing from the store",
                hint="edit the source and enter its password again",
            )
        try:
            return row[0], self._key().decrypt(bytes(row[1])).decode()
        except InvalidToken as e:
            raise StoreError(
                f"credential '{row[2]}' cannot be decrypted with {self.key_path}",
                hint="the key file was replaced; restore it, or enter the password again",
            ) from e

    def delete(self, db: Database, cred_id: int) -> None:
        db.execute("DELETE FROM credentials WHERE id=?", [cred_id])
