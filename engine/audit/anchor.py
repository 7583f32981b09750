"""What keeps the audit chain honest from outside the store: a node-local key and a checkpoint per store.

The key (32 random bytes, a 0600 file made on the first record that needs it) keys each record's MAC
(HMAC-SHA256), so someone who can write the store but not read the key can neither forge a record nor
recompute the chain after an edit. The checkpoint (a 0600 JSON file beside the key, one per store, named
after the store's path) holds the sequence number and MAC of the last record written, under a lock that `verify` also takes,
so a deleted tail or a store file rolled back to an older copy no longer matches it.

An append is two-phase, so a writer killed between the store and the checkpoint leaves no false alarm:
before the store commits, the checkpoint the record will make is written durably as the *intent*
(`<checkpoint>.pending`); after the commit it is moved over the checkpoint. A writer that died after
its commit left an intent naming a record the store holds with that very MAC: `verify` and the next
writer take it as the checkpoint. One that died before its commit left an intent naming a record the
store lacks: it is ignored, and the next append replaces it. Only a holder of the key can have made
an intent that matches a record's MAC, and only a writer of this folder can have placed it.
A writer that finds the store's head differs from the checkpoint otherwise (someone else's hand) still
appends, and carries a note of it in the checkpoint from then on, so `verify` keeps saying so.

These files are trusted only when they are fleetdeck's own: opened without following a symbolic link
(one planted at the key's path would hand fleetdeck a key the planter knows), regular files, not
readable or writable by group or others, owned by this user (or, for a reader such as an auditor
running as root, by the store's owner), in a folder no one else can write. Anything else is refused
with the file and the reason: writing (the action then does not happen) and verifying alike.

Nothing here is created by reading: listing or verifying never makes a key, a checkpoint or a lock.
Default place: the XDG state folder (`~/.local/state/fleetdeck/audit/`), apart from the store's data
folder, so restoring a backup of one does not restore the other; `[audit] key_file` moves it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from store.paths import private_dir, state_dir

KEY_BYTES = 32
LOCK_WAIT_S = 10.0  # how long an append or verify waits for another writer's lock (SQLite's wait is 5 s)


class AnchorError(Exception):
    """The key or the checkpoint cannot be read or written; the message names the file and why."""


def default_key_file() -> Path:
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


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a power cut must not bring the old name back)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Anchor:
    """The key file and the checkpoint of one store."""

    key_file: Path
    checkpoint_file: Path
    store_uid: int | None = None  # the store file's owner: whose key and checkpoint a reader may trust

    @classmethod
    def of(cls, store_path: Path, key_file: Path | None = None, checkpoint_file: Path | None = None) -> Anchor:
        key = Path(key_file).expanduser() if key_file else default_key_file()
        if checkpoint_file is None:
            real = os.path.realpath(Path(store_path).expanduser())
            name = f"{Path(real).stem}-{hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
            checkpoint_file = key.parent / f"{name}.checkpoint"
        try:
            uid: int | None = os.stat(Path(store_path).expanduser()).st_uid
        except OSError:
            uid = None
        return cls(key, Path(checkpoint_file), uid)

    @property
    def pending_file(self) -> Path:
        """The intent: the checkpoint the record being committed will make (see the module's doc)."""
        return self.checkpoint_file.with_name(self.checkpoint_file.name + ".pending")

    # -- files that must be fleetdeck's own -------------------------------------------------------
    def _owners(self, writing: bool) -> set[int]:
        euid = os.geteuid()
        return {euid} if writing or self.store_uid is None else {euid, self.store_uid}

    def _check_folder(self, writing: bool) -> None:
        folder = self.key_file.parent
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AnchorError(f"cannot use the audit folder {folder}: {exc.strerror or exc}") from exc
        if st.st_uid not in self._owners(writing):
            raise AnchorError(f"the audit folder {folder} is owned by uid {st.st_uid}, not by this user (uid "
                              f"{os.geteuid()}): its owner could replace the key and checkpoint in it")
        if st.st_mode & 0o022:
            raise AnchorError(f"the audit folder {folder} can be written by others (mode {st.st_mode & 0o777:04o}): "
                              "they could replace the key and checkpoint in it; chmod 700 it")

    def _read_private(self, path: Path, what: str, writing: bool) -> str:
        """The text of a key or checkpoint file, if it is fleetdeck's own (FileNotFoundError if absent)."""
        self._check_folder(writing)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AnchorError(f"the audit {what} {path} is a symbolic link: fleetdeck follows none there "
                                  "(whoever made it chooses the file read); put the file itself there") from exc
            raise AnchorError(f"cannot read the audit {what} {path}: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AnchorError(f"the audit {what} {path} is not a regular file")
            if st.st_uid not in self._owners(writing):
                raise AnchorError(f"the audit {what} {path} is owned by uid {st.st_uid}, not by this user (uid "
                                  f"{os.geteuid()}): its owner could have written it")
            if st.st_mode & 0o077:
                extra = ", and if others may have read it, it is no longer secret" if what == "key" else ""
                raise AnchorError(f"the audit {what} {path} is open to others (mode {st.st_mode & 0o777:04o}): "
                                  f"chmod 600 it{extra}")
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError as exc:
            raise AnchorError(f"cannot read the audit {what} {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        try:
            return b"".join(chunks).decode()
        except UnicodeDecodeError as exc:
            raise AnchorError(f"{path} is not a fleetdeck audit {what} (it was changed, or is another file)") from exc

    @property
    def lock_file(self) -> Path:
        return self.checkpoint_file.with_name(self.checkpoint_file.name + ".lock")

    # -- the key ----------------------------------------------------------------------------------
    def key(self, create: bool, writing: bool | None = None) -> Key | None:
        """The key; made (0600, atomically, once even with racing writers) when `create` and absent.
        `writing` (default: `create`): for a record, so only a key of this user's is used."""
        writing = create if writing is None else writing
        try:
            return _parse_key(self.key_file, self._read_private(self.key_file, "key", writing))
        except FileNotFoundError:
            if not create:
                return None
        try:
            # Checked before private_dir, which would quietly chmod a folder of ours back to 0700: one that
            # others could write may already hold a key or checkpoint of theirs, so it is refused, not mended.
            self._check_folder(writing=True)
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
            return _parse_key(self.key_file, self._read_private(self.key_file, "key", writing=True))
        except FileNotFoundError as exc:
            raise AnchorError(f"the audit key {self.key_file} vanished as it was made") from exc

    # -- the checkpoint ---------------------------------------------------------------------------
    def checkpoint(self, key: Key | None, writing: bool = False) -> Checkpoint | None:
        """The checkpoint, checked against `key` (its own MAC) when there is one."""
        return self._checkpoint_at(self.checkpoint_file, "checkpoint", key, writing)

    def pending(self, key: Key | None, writing: bool = False) -> Checkpoint | None:
        """The intent a writer left (it died between writing it and confirming), if any."""
        return self._checkpoint_at(self.pending_file, "checkpoint intent", key, writing)

    def _checkpoint_at(self, path: Path, what: str, key: Key | None, writing: bool) -> Checkpoint | None:
        try:
            doc = json.loads(self._read_private(path, what, writing))
            cp = Checkpoint(int(doc["seq"]), str(doc["mac"]), tuple(str(n) for n in doc.get("notes", [])))
            cmac = str(doc["cmac"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"the audit {what} {path} is not one fleetdeck wrote") from exc
        if key is not None and not hmac.compare_digest(cmac, _checkpoint_mac(key, cp)):
            # Keyed like the records: pointing it at an earlier record (to hide a deleted tail) needs the key.
            raise AnchorError(f"the audit {what} {path} was not written with this node's key {self.key_file} "
                              "(changed by hand, or from another node)")
        return cp

    def prepare(self, cp: Checkpoint, key: Key) -> Path:
        """Write the next checkpoint, keyed, to a temporary file beside it (so a full or read-only folder
        fails before the record is committed); `intend()` moves it into place as the intent."""
        tmp = self.checkpoint_file.with_name(f".{self.checkpoint_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                data = json.dumps({"seq": cp.seq, "mac": cp.mac, "notes": list(cp.notes),
                                   "cmac": _checkpoint_mac(key, cp)}).encode()
                if os.write(fd, data) != len(data):
                    raise OSError(28, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise AnchorError(f"cannot write the audit checkpoint {self.checkpoint_file}: {exc.strerror or exc}") from exc
        return tmp

    def intend(self, cp: Checkpoint, key: Key) -> None:
        """Before the store commits: `cp`, durably, as the intent (it replaces any a dead writer left)."""
        tmp = self.prepare(cp, key)
        try:
            os.replace(tmp, self.pending_file)
            _fsync_dir(self.pending_file.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise AnchorError(f"cannot write the audit checkpoint {self.checkpoint_file}: {exc.strerror or exc}") from exc

    def confirm(self) -> None:
        """After the store committed: the intent becomes the checkpoint."""
        os.replace(self.pending_file, self.checkpoint_file)
        _fsync_dir(self.checkpoint_file.parent)

    def withdraw(self) -> None:
        """The store did not commit: the intent names nothing; drop it."""
        self.pending_file.unlink(missing_ok=True)

    @contextmanager
    def locked(self, write: bool) -> Iterator[None]:
        """The writers' lock (exclusive; made if absent) or a reader's (shared; none if no writer ever ran)."""
        try:
            # O_NONBLOCK: a FIFO at the lock's name is met at once (a read-only open of one waits for a writer
            # for ever) and refused below as not a regular file; it changes nothing for the file itself.
            if write:
                self._check_folder(writing=True)  # before private_dir: see key()
                private_dir(self.lock_file.parent)
                fd = os.open(self.lock_file, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             0o600)
            else:
                fd = os.open(self.lock_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise AnchorError(f"the audit lock {self.lock_file} is not a regular file (a FIFO or a device "
                                  "was put there): remove it; fleetdeck makes the lock itself")
        except AnchorError:
            raise
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
            self._take(fd, write)
            if write:  # who holds it, for the message of a writer or reader that gives up waiting
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _take(self, fd: int, write: bool) -> None:
        """Wait up to LOCK_WAIT_S for the lock: a writer stopped while holding it (suspended, hung on a
        dead disk) makes every action fail closed with a line that says so, not hang for ever."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        by = f" by process {holder}" if holder.isdigit() else ""
        raise AnchorError(f"the audit lock {self.lock_file} is held{by} for more than {LOCK_WAIT_S:g} s: "
                          "a fleetdeck process stopped while writing a record? (resume or end it, then retry)")


def _checkpoint_mac(key: Key, cp: Checkpoint) -> str:
    body = json.dumps({"seq": cp.seq, "mac": cp.mac, "notes": list(cp.notes)}, sort_keys=True, separators=(",", ":"))
    return key.mac(b"fleetdeck-checkpoint-1\0" + body.encode())


def _parse_key(path: Path, text: str) -> Key:
    try:
        doc: dict[str, Any] = json.loads(text)
        secret = bytes.fromhex(doc["key"])
        created = float(doc["created"])
        if doc.get("fleetdeck_audit_key") != 1 or len(secret) != KEY_BYTES:
            raise ValueError("not a key")
    except (ValueError, KeyError, TypeError) as exc:
        raise AnchorError(f"{path} is not a fleetdeck audit key (it was changed, or is another file)") from exc
    return Key(secret, created)
