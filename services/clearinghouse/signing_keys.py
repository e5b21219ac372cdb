"""Participants' order-signing keys on local disk, for the demo, the bench, drills and tests.

:class:`SigningKeyStore` keeps one Ed25519 private key per participant in
``<directory>/<participant_id>/signing-key.pem`` (PKCS#8 PEM, unencrypted, file mode
0600, directories 0700). The default directory is ``.state/pki`` in the checkout
(git-ignored), the tree where participants' TLS material goes too; this module writes
no other file there. A real participant keeps its key in its own HSM or KMS and
registers only the public half (``Participant.signing_keys``); this store stands in for
that on one machine.
"""

from __future__ import annotations

import os
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from clearinghouse.domain.signing import public_key_bytes
from clearinghouse.localcluster.paths import repo_root
from clearinghouse.security.pki import participant_folder_conflict

KEY_FILE: Final = "signing-key.pem"
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
# A participant id as validation allows it, minus a leading dot: it names a directory.
_SAFE_ID: Final = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}")


def default_directory() -> Path:
    """The local CA's folder (``CLEARING_PKI_DIR`` or ``.state/pki``): a participant's
    signing key sits beside its TLS certificate."""
    env = os.environ.get("CLEARING_PKI_DIR")
    return Path(env) if env else repo_root() / ".state" / "pki"


class SigningKeyStore:
    """Ed25519 signing keys by participant id, created on first use; thread-safe."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._lock = threading.Lock()

    def path(self, participant_id: str) -> Path:
        """``<directory>/<participant_id>/signing-key.pem``; ValueError for an id that
        cannot name a folder or whose folder is another's (the CA's, a node's, ...)."""
        if not _SAFE_ID.fullmatch(participant_id):
            raise ValueError(f"participant id {participant_id!r} cannot name a key directory")
        taken = participant_folder_conflict(participant_id)
        if taken is not None:
            raise ValueError(f"no signing key for {participant_id!r} here: {taken}")
        return self.directory / participant_id / KEY_FILE

    def _load(self, participant_id: str) -> Ed25519PrivateKey | None:
        path = self.path(participant_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        loaded = load_pem_private_key(data, password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return loaded

    def existing(self, participant_id: str) -> Ed25519PrivateKey | None:
        """The participant's key if one was created, else None (nothing is written)."""
        key = self._keys.get(participant_id)
        if key is not None or not _SAFE_ID.fullmatch(participant_id):
            return key
        if participant_folder_conflict(participant_id) is not None:
            return None
        loaded = self._load(participant_id)
        if loaded is None:
            return None
        with self._lock:
            return self._keys.setdefault(participant_id, loaded)

    def get_or_create(self, participant_id: str) -> Ed25519PrivateKey:
        """The participant's key, generated and stored (0600) if it has none yet."""
        with self._lock:
            key = self._keys.get(participant_id) or self._load(participant_id)
            if key is None:
                self._create(participant_id)
                key = self._load(participant_id)
            if key is None:
                raise OSError(f"{self.path(participant_id)} vanished right after it was written")
            return self._keys.setdefault(participant_id, key)

    def _create(self, participant_id: str) -> None:
        path = self.path(participant_id)
        for d in (self.directory, path.parent):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            d.chmod(DIR_MODE)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # A hard link never replaces a key that another process wrote meanwhile:
            # whichever wrote first, the file holds the participant's one key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    def public_key(self, participant_id: str) -> bytes:
        """The raw 32-byte public key of the participant's key (created if needed)."""
        return public_key_bytes(self.get_or_create(participant_id))


@lru_cache(maxsize=1)
def default_store() -> SigningKeyStore:
    """The store in ``.state/pki``, shared by every client of this process."""
    return SigningKeyStore()


__all__ = ["KEY_FILE", "SigningKeyStore", "default_directory", "default_store"]
