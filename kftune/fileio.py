"""Small I/O helpers: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from kftune.config import KftuneError


def umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, racing other threads' new files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder beside `path`; it replaces `path` only if the block succeeds.

    An existing `path` is replaced only where it holds nothing but names the new output has (an earlier run of
    the same step) and hidden files, which move into the new output (the .gitignore DVC writes in a stage's output):
    an output pointed at a folder of the user's (the input's, the project's) must not delete it.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            gone = set(os.listdir(path)) - set(os.listdir(tmp)) if path.is_dir() else {path.name}
            kept = [n for n in gone if n.startswith(".") and (path / n).is_file()]  # DVC's .gitignore: carried over
            other = sorted(gone - set(kept))
            if other:
                raise KftuneError(f"{path}: the output would replace {', '.join(other[:3])}"
                                  f"{f' and {len(other) - 3} more' if len(other) > 3 else ''}, which this step does not "
                                  f"write; choose an output folder of its own (nothing was changed)")
            for name in kept:
                os.replace(path / name, tmp / name)
            shutil.rmtree(path)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would keep the output from other users (a server's uid)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, obj, sort_keys: bool = True) -> None:
    """Whole or not at all: written under a hidden name, synced (a power loss must not leave an empty file behind
    the new name), then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # one per writer
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600: readable as any file written here
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def reading(encoding: str) -> str:
    """The codec to read a file declared `encoding` with: UTF-8 also drops a byte-order mark (Excel's and
    Notepad's UTF-8 files start with one)."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A cell a spreadsheet will not run: text starting like a formula gets a leading apostrophe (OWASP); so does
    text starting with one, so that spreadsheet_value gives back exactly what was written."""
    return f"'{value}" if isinstance(value, str) and value.startswith((*FORMULA_START, "'")) else value


def spreadsheet_value(value):
    """The inverse of spreadsheet_safe: a cell read back from such a CSV, without the apostrophe it was given."""
    return value[1:] if isinstance(value, str) and value.startswith("'") and \
        value[1:].startswith((*FORMULA_START, "'")) else value


def write_csv(df, path: str | Path) -> None:
    """A CSV for people and spreadsheets: every text cell made spreadsheet_safe."""
    df.map(spreadsheet_safe).to_csv(path, index=False)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


class Busy(KftuneError):
    """Another process holds the lock."""


@contextlib.contextmanager
def single_instance(lock_path: str | Path, what: str = "scheduler", wait: bool = False):
    """Hold an exclusive lock while the block runs; a second holder refuses to start (Busy), or with `wait`
    waits for the first to finish."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            raise Busy(f"another kftune {what} is running (lock {lock_path}, pid {f.read().strip() or '?'}); "
                       f"wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


S3_LEASE_STALE_S = 120.0  # a lease whose object has not changed for this long, on the waiter's clock, is dead


def _s3_status(exc: BaseException) -> int | None:
    """The HTTP status behind an s3fs error (s3fs keeps botocore's error as the cause)."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _s3_conflict(exc: BaseException) -> bool:
    """A conditional write lost: 412 Precondition Failed, or AWS's 409 for two conditional writes at once."""
    return isinstance(exc, FileExistsError) or _s3_status(exc) in (409, 412)


@contextlib.contextmanager
def s3_lease(fs, path: str, what: str, stale_after: float = S3_LEASE_STALE_S, poll: float = 2.0):
    """Hold the object `path` on S3 (an s3fs filesystem) while the block runs; other holders wait.

    Taken by a conditional create (If-None-Match: *); the holder rewrites it every stale_after / 4 seconds (If-Match
    its last ETag), so a waiter that sees the same ETag for `stale_after` seconds on its own clock knows the holder
    is dead (a killed pod) and takes the lease over, again by If-Match, so only one waiter wins. Released by deleting
    the object if it is still this holder's. Needs an object store with conditional writes (AWS S3, MinIO); one
    that answers them with 400 or 501 runs the block without a lease, with a warning. Yields whether it holds one.
    """
    import logging
    import socket
    import threading
    import time
    import uuid

    log = logging.getLogger(__name__)
    bucket, key, _ = fs.split_path(path)
    me = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"

    def put(beat: int, **condition) -> str:
        body = json.dumps({"holder": me, "what": what, "beat": beat}).encode()
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    etag, seen, since, unsupported = None, None, 0.0, None
    while etag is None:
        try:
            etag = put(0, IfNoneMatch="*")
            break
        except OSError as exc:
            if not _s3_conflict(exc):
                if _s3_status(exc) not in (400, 501):
                    raise
                unsupported = exc
                break
        try:
            current = fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        except FileNotFoundError:
            continue  # released meanwhile
        if current != seen:
            seen, since = current, time.monotonic()
        elif time.monotonic() - since >= stale_after:
            try:
                etag = put(0, IfMatch=seen)
            except OSError as exc:
                if not _s3_conflict(exc):
                    raise
                seen = None  # another waiter took it over first, or the holder came back
                continue
            log.warning("%s: took over the lease %s, unchanged for %.0f s (its holder stopped)", what, path,
                        stale_after)
            break
        time.sleep(poll)
    if unsupported is not None:
        log.warning("%s: %s refuses conditional writes (%s); running without a lease", what, path, unsupported)
        yield False
        return
    held, stop = {"etag": etag, "lost": False}, threading.Event()

    def heartbeat():
        beat = 0
        while not stop.wait(stale_after / 4):
            beat += 1
            try:
                held["etag"] = put(beat, IfMatch=held["etag"])
            except OSError as exc:
                if not _s3_conflict(exc):  # the store, not the lease: the next beat tries again
                    log.warning("%s: could not renew the lease %s (%s); trying again", what, path, exc)
                    continue
                held["lost"] = True
                log.error("%s: lost the lease %s; another holder may be running", what, path)
                return

    beating = threading.Thread(target=heartbeat, name="kftune-s3-lease", daemon=True)
    beating.start()
    try:
        yield True
    finally:
        stop.set()
        beating.join()
        if not held["lost"]:  # head, then delete: a holder that took over in between would lose its lease, which
            with contextlib.suppress(FileNotFoundError):  # needs this one's beats to have stopped stale_after ago
                if fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"] == held["etag"]:
                    fs.call_s3("delete_object", Bucket=bucket, Key=key)
