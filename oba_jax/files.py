"""The files a run reads and writes: atomic writes, fingerprints of inputs, clear errors.

  write_atomic(path, lambda f: f.write(data))   # whole or not at all; the user's umask
  with exclusive(path + ".lock"): ...           # one process at a time (e.g. preparing data)
  fingerprint(path)                             # what a run read, to know it again
  DamagedFileError, DiskFullError               # one paragraph naming the file

A write goes to a hidden temporary file in the same directory, is flushed to the disk and
renamed into place, so a kill leaves the old file or the new one. The temporary file is
created with mode 0666 minus the umask (as `open` does; `tempfile` would give 0600), and is
removed when the write fails (or, after a kill, by `remove_leftovers` when the workdir is
claimed again). A full disk (ENOSPC, EDQUOT) becomes a `DiskFullError` that names
the directory.

A fingerprint identifies an input without keeping it: for a file its size and SHA-256; for a
directory the relative path and size of every file in it (not their contents, so that a
data set of a million images costs a listing, not a read).
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from typing import IO, Any

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # `write_atomic`'s temporary files


class DamagedFileError(ValueError):
  """A file that is there but cannot be read as what it should be (cut short, overwritten)."""


class DiskFullError(OSError):
  """No space left where a run writes; says where, and that the run resumes once there is."""


def damaged(path: str | os.PathLike, what: str, error: BaseException | str,
            way_out: str) -> DamagedFileError:
  """The error for `path` (`what` it should be) that cannot be read: the first line of
  `error`, and `way_out` (what to do)."""
  reason = error if isinstance(error, str) else (
      f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}")
  return DamagedFileError(f"{os.fspath(path)} ({what}) cannot be read ({reason}). {way_out}")


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
  """Calls `write(f)` on a new binary file that then replaces `path` (see the module doc)."""
  path = os.path.abspath(os.fspath(path))
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  except OSError as error:
    raise _full(error, directory) from None
  try:
    with os.fdopen(handle, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException as error:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    if isinstance(error, OSError):
      raise _full(error, directory) from None
    raise


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on `lock_path` (created) while the block runs; another process
  entering the block waits for it. Released by the OS if the holder is killed."""
  os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
  with open(lock_path, "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
  """Removes the temporary files that killed writers left below `directory` (returned).

  Only for a directory no other process writes to (a locked workdir): the names are
  `write_atomic`'s own, so no other file is touched.
  """
  removed = []
  for root, _, names in os.walk(directory):
    for name in names:
      if _TEMPORARY.fullmatch(name):
        with contextlib.suppress(OSError):
          os.unlink(os.path.join(root, name))
          removed.append(os.path.join(root, name))
  return removed


def _full(error: OSError, directory: str) -> OSError:
  """A `DiskFullError` naming `directory` for a full disk, else `error` itself."""
  if error.errno not in FULL_DISK:
    return error
  return DiskFullError(
      error.errno, f"no space left on the disk holding {directory} ({error.strerror}). Nothing "
      "half-written was kept: free some space and run the same command again; it goes on "
      "from the last stage that was written")


def fingerprint(path: str | os.PathLike) -> dict:
  """{"path", "size", "sha256"} of a file; of a directory, over its files' names and sizes."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    digest, size, count = hashlib.sha256(), 0, 0
    for root, directories, names in os.walk(path):
      directories.sort()
      for name in sorted(names):
        file = os.path.join(root, name)
        file_size = os.path.getsize(file)
        digest.update(f"{os.path.relpath(file, path)}\0{file_size}\n".encode())
        size, count = size + file_size, count + 1
    return {"path": path, "files": count, "size": size, "names_and_sizes": digest.hexdigest()}
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"path": path, "size": os.path.getsize(path), "sha256": digest.hexdigest()}
