"""Credentials at rest: encrypted in the store with a key only root can read.

The Fernet key that encrypts every credential is kept in one of two ways, beside the store:

- ``secret.key.cred``: sealed by ``systemd-creds encrypt --with-key=host`` (AES-256-GCM under
  the machine's root-only /var/lib/systemd/credential.secret). Used when systemd-creds works
  here; new installs choose it. The key is passed to and from systemd-creds on stdin/stdout,
  never in argv, and never written to disk in clear.
- ``secret.key``: the key itself, a root-only file (0600 in a 0700 directory). The fallback
  when systemd-creds is missing or refuses, and what stores created before kept using
  (``ferryman store seal-key`` seals it).

FERRYMAN_VAULT_KEY=auto|systemd-creds|file chooses for a new key (default auto). A store
backup alone holds no usable secret; the key (and, sealed, the host's credential.secret) must
be backed up separately, on purpose. Secrets reach helpers by 0600 file or fd, never argv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlite_utils import Database

from appliance.errors import StoreError
from store.db import now

KEY_NAME = "secret.key"
SEALED_NAME = "secret.key.cred"
CRED_NAME = "ferryman-vault"  # embedded in the sealed file; decrypt checks it
HOST_SECRET = Path("/var/lib/systemd/credential.secret")
BACKENDS = ("auto", "systemd-creds", "file")


def _creds(args: list[str], data: bytes) -> bytes:
    exe = shutil.which("systemd-creds")
    if exe is None:
        raise StoreError("systemd-creds is not installed", hint="apt-get install -y systemd")
    try:
        r = subprocess.run(
            [exe, *args], input=data, capture_output=True, timeout=60, env={"LC_ALL": "C"}
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StoreError(f"systemd-creds {args[0]} failed: {e}") from e
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        raise StoreError(f"systemd-creds {args[0]} failed: {msg[-1] if msg else r.returncode}")
    return r.stdout


def seal(key: bytes) -> bytes:
    return _creds(["encrypt", "--with-key=host", f"--name={CRED_NAME}", "-", "-"], key)


def unseal(blob: bytes) -> bytes:
    return _creds(["decrypt", f"--name={CRED_NAME}", "-", "-"], blob)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Vault:
    def __init__(self, key_path: Path, backend: str | None = None) -> None:
        self.key_path = key_path  # the plain key file; the sealed one sits beside it
        self.sealed_path = key_path.with_name(SEALED_NAME)
        self.want = backend or os.environ.get("FERRYMAN_VAULT_KEY", "auto")
        if self.want not in BACKENDS:
            raise StoreError(
                f"FERRYMAN_VAULT_KEY={self.want} is not one of {', '.join(BACKENDS)}",
                hint="unset it (auto) or set systemd-creds or file",
            )
        self.fallback_reason = ""  # why a new key went to a file although auto was asked
        self._fernet: Fernet | None = None

    @property
    def backend(self) -> str:
        """How the key is kept now: systemd-creds, file, or none (no key yet)."""
        if self.sealed_path.exists():
            return "systemd-creds"
        return "file" if self.key_path.exists() else "none"

    def describe(self) -> dict[str, str]:
        b = self.backend
        if b == "systemd-creds":
            where = f"{self.sealed_path}, sealed with the host key {HOST_SECRET}"
        elif b == "file":
            where = f"{self.key_path}, root-only file"
        else:
            where = "no key yet: created with the first stored password"
        return {"backend": b, "where": where, "fallback_reason": self.fallback_reason}

    def _create(self) -> bytes:
        key = Fernet.generate_key()
        if self.want != "file":
            try:
                blob = seal(key)
                if unseal(blob).strip() != key:
                    raise StoreError("systemd-creds decrypt returned another key")
                _write_private(self.sealed_path, blob)
                return key
            except StoreError as e:
                if self.want == "systemd-creds":
                    raise
                self.fallback_reason = e.message
        _write_private(self.key_path, key)
        return key

    def _load(self) -> bytes:
        if self.sealed_path.exists():
            self._private(self.sealed_path)
            try:
                return unseal(self.sealed_path.read_bytes()).strip()
            except StoreError as e:
                raise StoreError(
                    f"the sealed key {self.sealed_path} cannot be opened: {e.message}",
                    hint=f"it is bound to this machine's {HOST_SECRET}: restore that file, "
                    "or remove the sealed key and enter every source password again",
                ) from e
        if self.key_path.exists():
            self._private(self.key_path)
            return self.key_path.read_bytes().strip()
        return self._create()

    @staticmethod
    def _private(path: Path) -> None:
        if path.stat().st_mode & 0o077:
            raise StoreError(
                f"the secret key {path} is readable by others", hint=f"chmod 600 {path}"
            )

    def _key(self) -> Fernet:
        if self._fernet is None:
            self._fernet = Fernet(self._load())
        return self._fernet

    def seal_existing(self) -> str:
        """Move a plain key file under systemd-creds; the plain file is overwritten, then
        removed only after the sealed copy decrypts to the same key."""
        if self.backend != "file":
            return f"nothing to seal: the key is {self.describe()['where']}"
        self._private(self.key_path)
        key = self.key_path.read_bytes().strip()
        blob = seal(key)
        if unseal(blob).strip() != key:
            raise StoreError("systemd-creds decrypt returned another key", hint="key file kept")
        _write_private(self.sealed_path, blob)
        with open(self.key_path, "r+b") as f:
            f.write(b"\0" * len(key))
            f.flush()
            os.fsync(f.fileno())
        self.key_path.unlink()
        return f"key sealed into {self.sealed_path}; {self.key_path} removed"

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
                f"credential '{row[2]}' cannot be decrypted with the key in "
                f"{self.describe()['where']}",
                hint="the key was replaced; restore it, or enter the password again",
            ) from e

    def delete(self, db: Database, cred_id: int) -> None:
        db.execute("DELETE FROM credentials WHERE id=?", [cred_id])
