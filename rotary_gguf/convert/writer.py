"""Writing the output safely: an unnamed temp file next to OUT, header, tensor data, fsync, then
linked into place; stale temps of dead processes removed; signals turned into a clean stop."""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError
from .conversion_plan import OutTensor, pad_to


TEMP_MARK = ".rotary-tmp-"  # temp files are ".<OUT name>.rotary-tmp-<pid>" in OUT's folder
COPY_CHUNK = 16 * 2**20  # bytes per copy call: keeps progress and Ctrl-C responsive
# Every this many bytes written, start their writeback (posix_fadvise DONTNEED): the disk writes
# while we copy, the final fsync has little left, and a 21 GB output does not fill the page cache.
WRITEBACK_STEP = 16 * 2**20
# copy_file_range errors that mean "not here" (other file systems, old kernels, seccomp filters)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
# open(O_TMPFILE) errors that mean "no unnamed files here" (file system, kernel, no /proc to link)
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.ENOSYS}


# --- writing -------------------------------------------------------------------------------------
class _Step(enum.Enum):
    NEW = "new"
    OPEN = "open"
    HEADER = "header written"
    DATA = "data written"
    SYNCED = "synced"
    DONE = "renamed"
    DISCARDED = "discarded"


class GGUFFileWriter:
    """Writes OUT in fixed steps that check each other: open -> header -> tensor data (in header
    order) -> fsync -> link into place. The file has no name until it is complete (O_TMPFILE,
    linked to OUT at the end), so even SIGKILL leaves nothing behind; where the file system cannot
    make unnamed files it is a temp file next to OUT, which `discard` removes at any step and
    `remove_stale_temps` removes after a hard kill."""

    def __init__(self, out: Path, header: bytes, offsets: list[int], total_bytes: int, alignment: int):
        self.out = out
        self.temp = temp_path(out)
        self._header, self._offsets, self._total, self._alignment = header, offsets, total_bytes, alignment
        self._step = _Step.NEW
        self._fd: int | None = None
        self._named = False  # whether the file being written has a name (the temp name) yet
        self._written = 0  # bytes of the file written so far
        self._written_back = 0  # bytes whose writeback was started
        self._tensors = 0
        self._kernel_copy = hasattr(os, "copy_file_range")

    def _expect(self, step: _Step) -> None:
        if self._step is not step:
            raise RuntimeError(f"GGUF writer: expected step {step.value!r}, at {self._step.value!r}")

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def open(self) -> None:
        self._expect(_Step.NEW)
        try:
            if not (hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")):
                raise OSError(errno.ENOSYS, "no unnamed files here")
            self._fd = os.open(self.out.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
        except OSError as e:  # not on this system or file system: a named temp file
            if e.errno not in _NO_TMPFILE:
                raise
            self.temp.unlink(missing_ok=True)  # left by an earlier process that had our pid
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._named = True
        self._step = _Step.OPEN

    def write_header(self) -> None:
        self._expect(_Step.OPEN)
        self._write(self._header)
        self._step = _Step.HEADER if self._offsets else _Step.DATA

    def write_tensor(self, tensor: OutTensor, src_fd: int, advance: Callable[[int], None]) -> None:
        """Copy the next tensor's byte ranges from the input, then its padding."""
        self._expect(_Step.HEADER)
        expected = len(self._header) + self._offsets[self._tensors]
        if self._written != expected:
            raise RuntimeError(f"GGUF writer: {tensor.name} would start at {self._written}, the header says {expected}")
        for offset, n in tensor.pieces:
            self._copy(src_fd, offset, n, advance)
        self._write(bytes(pad_to(tensor.nbytes, self._alignment)))
        self._tensors += 1
        if self._tensors == len(self._offsets):
            self._step = _Step.DATA

    def sync(self) -> None:
        """Check the size and flush to disk."""
        self._expect(_Step.DATA)
        size = os.fstat(self._fd).st_size
        if size != self._total or self._written != self._total:
            raise RuntimeError(f"GGUF writer: wrote {size} bytes, planned {self._total}")
        os.fsync(self._fd)
        self._step = _Step.SYNCED

    def named(self) -> Path:
        """A path of the synced file, for checks that open it by name: the temp name (given to an
        unnamed file now; until the rename, a hard kill leaves it for `remove_stale_temps`)."""
        self._expect(_Step.SYNCED)
        if not self._named:
            self._link(self.temp)
        return self.temp

    def commit(self) -> None:
        """Put the file in place as OUT (replacing an old OUT atomically) and make it durable."""
        self._expect(_Step.SYNCED)
        if not self._named:
            try:
                self._link(self.out)  # a new OUT: the complete file gets its name in one step
            except FileExistsError:
                self._link(self.temp)  # an old OUT: renamed over below
        if self._named:
            os.replace(self.temp, self.out)
        self._step = _Step.DONE
        self._close()
        _fsync_dir(self.out.parent)

    def discard(self) -> None:
        """Drop the file (any step before it is in place); never raises."""
        self._close()
        if self._step is not _Step.DONE:
            if self._named:
                with contextlib.suppress(OSError):
                    self.temp.unlink(missing_ok=True)
            self._step = _Step.DISCARDED

    def _link(self, path: Path) -> None:
        """Give the unnamed file the name `path` (linkat through /proc, which needs no privilege)."""
        if path == self.temp:
            path.unlink(missing_ok=True)  # left by an earlier process that had our pid
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:  # with a folder fd os.link calls linkat(AT_SYMLINK_FOLLOW), which /proc's fd links need
            os.link(f"/proc/self/fd/{self._fd}", path.name, dst_dir_fd=folder, follow_symlinks=True)
        finally:
            os.close(folder)
        self._named = path == self.temp

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._written += n

    def _copy(self, src_fd: int, offset: int, count: int, advance: Callable[[int], None]) -> None:
        """Append input bytes [offset, offset+count) to the temp file."""
        while count:
            n = self._copy_chunk(src_fd, offset, min(count, COPY_CHUNK))
            if n == 0:
                raise UserError("the input file ended early (was it changed or truncated during the conversion?)")
            offset, count = offset + n, count - n
            advance(n)
            if self._written - self._written_back >= WRITEBACK_STEP:
                self._start_writeback()

    def _start_writeback(self) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._written_back, self._written - self._written_back, os.POSIX_FADV_DONTNEED)
        self._written_back = self._written

    def _copy_chunk(self, src_fd: int, offset: int, count: int) -> int:
        """One copy call: in the kernel (copy_file_range) where the file systems allow it, else
        through a buffer."""
        if self._kernel_copy:
            try:
                n = os.copy_file_range(src_fd, self._fd, count, offset)
                self._written += n
                return n
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                self._kernel_copy = False  # e.g. across file systems: use the buffer from now on
        data = os.pread(src_fd, count, offset)
        self._write(data)
        return len(data)


def temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{TEMP_MARK}{os.getpid()}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files that conversions into `folder` left behind when they were killed (their
    process is gone). Best effort: a folder we cannot list or a file we cannot remove is left."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        name, _, pid = p.name.rpartition(TEMP_MARK)
        if name.startswith(".") and pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier process had our pid; we are not writing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(fd)


class Interrupted(UserError):
    """A signal ended the conversion before the output was in place."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While writing, SIGINT, SIGTERM and SIGHUP raise Interrupted, so the output is dropped on the
    way out and the command ends with one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP (cleanup must not be cut short by a second Ctrl-C)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
