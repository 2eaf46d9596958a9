"""Writes that a crash, a kill or a power cut can never leave half done.

- A file is written under a hidden temporary name in the same directory, flushed to disk, then renamed
  over its target (a rename within one directory is atomic).
- A directory is built under a hidden temporary name (`atomic_dir`), and renamed into place only when
  complete; an older directory of that name is renamed aside first and deleted after.
- Every file a directory holds follows the umask, as a file that open() creates does: safetensors writes
  its files 0600, so a server run by another user could not read the model (`follow_umask`).
- A directory is deleted by renaming it aside first, so a kill halfway never leaves a half-deleted tree
  under its real name.
- The read side: `open_regular` opens a file for reading only if it is a regular file, and never blocks (a
  FIFO, /dev/zero, a socket or a directory, or a link to one, is refused in one line before anything is
  read); every file the project reads goes through it. `read_bounded` also checks the file's size before
  memory is allocated for it.
Hidden leftovers of killed writes are named `.NAME.tmp-PID` and `.NAME.old-...`: never read, and
removed by the next run (checkpoint.claim_output_dir).
"""
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from support.errors import UserError


def fsync_dir(path: Path, files: bool = True):
    """Flush a directory's files (and its entry list) to disk, so a power cut cannot undo a rename."""
    for f in Path(path).iterdir() if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj):
    """Write JSON straight to `path` and flush it (inside a directory that atomic_dir renames later)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str | bytes):
    """Replace the file `path` with `text` (str, or bytes such as a PNG's) in one step: a reader sees the old
    content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only disk refuses the cleanup too (EROFS): the first error is the one to tell
            pass
        raise


def write_json_atomic(path: Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2))


def remove(path: Path):
    """Delete a file or a directory tree; a directory is renamed to a hidden name first."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if not path.name.startswith("."):
            hidden = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(path, hidden)
            path = hidden
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path):
    """Move a finished directory into place. An existing `dst` is moved aside first and deleted after,
    so at every instant `dst` is either the old complete directory, absent, or the new complete one."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.time_ns()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent, files=False)
    remove(old)


def umask() -> int:
    """The process's umask, read without changing it (/proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: Path):
    """Give each regular file under `directory` the mode open() would (0666 less the umask): libraries that
    write their own files (safetensors: 0600) otherwise leave them unreadable to a teammate or a server."""
    mode = 0o666 & ~umask()
    for f in Path(directory).rglob("*"):
        if f.is_file() and not f.is_symlink() and stat.S_IMODE(f.stat().st_mode) != mode:
            os.chmod(f, mode)


@contextmanager
def atomic_dir(final: Path):
    """`with atomic_dir(path) as tmp:` write into `tmp`; on success it becomes `path` in one rename, on any
    error (or Ctrl-C) it is deleted and `path` is left as it was."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        follow_umask(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class NotRegularFile(UserError):
    """A path to read is a FIFO, a device, a socket or a directory (or a link to one): never opened."""


KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def file_kind(mode: int) -> str:
    """What an st_mode is, in words: "a regular file", "a named pipe (FIFO)", ..."""
    return "a regular file" if stat.S_ISREG(mode) else KINDS.get(stat.S_IFMT(mode), "not a regular file")


def not_regular(path, mode: int) -> NotRegularFile:
    return NotRegularFile(f"{path} is {file_kind(mode)}, not a regular file; only regular files are read, "
                          "point at a file")


def is_regular_file(path) -> bool:
    """Path.is_file() for files about to be read: False when nothing is there, True for a regular file, and
    anything else (a FIFO, a device, a link to one) a NotRegularFile, so it is named for what it is rather
    than reported missing."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISREG(mode):
        return True
    raise not_regular(path, mode)


def open_regular(path):
    """Open a file for reading (binary), only if it is a regular file, without ever blocking: a FIFO opened
    for reading waits for a writer, so the path is checked first (following links, as open does), opened
    with O_NONBLOCK in case it was swapped since, and checked again on the open descriptor. Anything but a
    regular file is a NotRegularFile (a UserError: one line); a missing file is FileNotFoundError."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular(path) -> bool:
    """Whether `path` is a regular file (or a link to one); False when it is missing or anything else."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refused (ValueError) beyond `max_bytes` before any of it is read: what a file may
    hold is bounded before memory is allocated for it. Only a regular file is opened (open_regular)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{size:,} bytes, over the {max_bytes:,} expected")
        data = f.read(max_bytes + 1)  # a file that grew since fstat still stops at the bound
    if len(data) > max_bytes:
        raise ValueError(f"more than the {max_bytes:,} bytes expected")
    return data
