"""What keeps the audit chain honest from outside the store: a node-local key and a checkpoint per store.

The key (32 random bytes, a 0600 file made on the first record that needs it) keys each record's MAC
(HMAC-SHA256), so someone who can write the store but not read the key can neither forge a record nor
recompute the chain after an edit. The checkpoint (a 0600 JSON file beside the key, one per store, named
after the store's path) holds the sequence number and MAC of the last record written; it is replaced
atomically after each append, under a lock that `verify` also takes, so a deleted tail or a store file
rolled back to an older copy no longer matches it. A writer that finds the store's head differs from
the checkpoint (a crash between the two, or someone else's hand) still appends, and carries a note of
it in the checkpoint from then on, so `verify` keeps saying so.

Nothing here is created by reading: listing or verifying never makes a key, a checkpoint or a lock.
Default place: the XDG state folder (`~/.local/state/fleetdeck/audit/`), apart from the store's data
folder, so restoring a backup of one does not restore the other; `[audit] key_file` moves it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

KEY_BYTES = 32


class AnchorError(Exception):
    """The key or the checkpoint cannot be read or written; the message names the file and why."""


def default_key_file() -> Path:
    from store.paths import state_dir

    return state_dir() / "audit" / "audit.key"


@dataclass(frozen=True)
class Key:
    secret: bytes
    created: float

    @property
    def kid(self) -> str:
        """A public name of the key (a hash of it), to tell "another key" from "a changed record"."""
        return hashlib.sha256(b"fleetdeck-audit-kid" + self.secret).hexdigest()[:8]

    def mac(self, data: bytes) -> str:
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    mac: str
    notes: tuple[str, ...] = ()  # what a writer found wrong before its append; kept from then on


@dataclass(frozen=True)
class Anchor:
    """The key file and the checkpoint of one store."""

    key_file: Path
    checkpoint_file: Path

    @classmethod
    def of(cls, store_path: Path, key_file: Path | None = None, checkpoint_file: Path | None = None) -> Anchor:
        key = Path(key_file).expanduser() if key_file else default_key_file()
        if checkpoint_file is None:
            real = os.path.realpath(Path(store_path).expanduser())
            name = f"{Path(real).stem}-{hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
            checkpoint_file = key.parent / f"{name}.checkpoint"
        return cls(key, Path(checkpoint_file))

    @property
    def lock_file(self) -> Path:
        return self.checkpoint_file.with_name(self.checkpoint_file.name + ".lock")

    # -- the key ----------------------------------------------------------------------------------
    def key(self, create: bool) -> Key | None:
        """The key; made (0600, atomically, once even with racing writers) when `create` and absent."""
        try:
            return _read_key(self.key_file)
        except FileNotFoundError:
            if not create:
                return None
        try:
            from store.paths import private_dir

            private_dir(self.key_file.parent)
            tmp = self.key_file.with_name(f".{self.key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                doc = {"fleetdeck_audit_key": 1, "created": time.time(), "key": secrets.token_hex(KEY_BYTES)}
                os.write(fd, (json.dumps(doc) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.key_file)  # fails if another writer made it first: theirs is the key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        except OSError as exc:
            raise AnchorError(f"cannot create the audit key {self.key_file}: {exc.strerror or exc}") from exc
        try:
            return _read_key(self.key_file)
        except FileNotFoundError as exc:
            raise AnchorError(f"the audit key {self.key_file} vanished as it was made") from exc

    # -- the checkpoint ---------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint | None:
        try:
            doc = json.loads(self.checkpoint_file.read_text())
            return Checkpoint(int(doc["seq"]), str(doc["mac"]), tuple(str(n) for n in doc.get("notes", [])))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AnchorError(f"cannot read the audit checkpoint {self.checkpoint_file}: {exc.strerror or exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"the audit checkpoint {self.checkpoint_file} is not one fleetdeck wrote") from exc

    def prepare(self, cp: Checkpoint) -> Path:
        """Write the next checkpoint to a temporary file beside it (so a full or read-only folder fails
        before the record is committed); `commit()` moves it into place."""
        tmp = self.checkpoint_file.with_name(f".{self.checkpoint_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                data = json.dumps({"seq": cp.seq, "mac": cp.mac, "notes": list(cp.notes)}).encode()
                if os.write(fd, data) != len(data):
                    raise OSError(28, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise AnchorError(f"cannot write the audit checkpoint {self.checkpoint_file}: {exc.strerror or exc}") from exc
        return tmp

    def commit(self, tmp: Path) -> None:
        os.replace(tmp, self.checkpoint_file)

    @contextmanager
    def locked(self, write: bool) -> Iterator[None]:
        """The writers' lock (exclusive; made if absent) or a reader's (shared; none if no writer ever ran)."""
        try:
            if write:
                from store.paths import private_dir

                private_dir(self.lock_file.parent)
                fd = os.open(self.lock_file, os.O_CREAT | os.O_RDWR, 0o600)
            else:
                fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            if write:
                raise AnchorError(f"cannot lock the audit checkpoint {self.lock_file}: no such folder") from None
            yield
            return
        except OSError as exc:
            if not write:
                yield  # a reader that cannot lock still reads; a concurrent append may then show as a race
                return
            raise AnchorError(f"cannot lock the audit checkpoint {self.lock_file}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _read_key(path: Path) -> Key:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise AnchorError(f"cannot read the audit key {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        doc: dict[str, Any] = json.loads(text)
        secret = bytes.fromhex(doc["key"])
        created = float(doc["created"])
        if doc.get("fleetdeck_audit_key") != 1 or len(secret) != KEY_BYTES:
            raise ValueError("not a key")
    except (ValueError, KeyError, TypeError) as exc:
        raise AnchorError(f"{path} is not a fleetdeck audit key (it was changed, or is another file)") from exc
    return Key(secret, created)
