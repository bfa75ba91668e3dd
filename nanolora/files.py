"""Writing files so that nothing is lost: a crash, a kill or a full disk mid-write leaves the
old output (or none), never a truncated one, and never neither.

An output NAME is written at `.NAME.tmp-PID` beside it. A file then replaces NAME in one
os.replace. A folder cannot replace a folder in one rename, so the old one is first renamed
aside to `.NAME.old-PID`, the new one renamed in, and only then the old one deleted: a kill
between the two renames leaves the old output aside, and the next write beside it puts it
back (see `clean_leftovers`). Everything written is fsynced before the rename, and the
folder after it, so a power cut cannot reorder the rename before the data.
"""
import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
_WRITING = set()  # temporary names this process is writing now (a nested atomic_path keeps its parent's)


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path` (nothing there yet); put what the block wrote
    there at `path` only if the block succeeds. Works for a file or a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # ours only by PID reuse (a restarted container): nothing live writes it
    _WRITING.add(tmp.absolute())
    try:
        yield tmp
        _fsync_tree(tmp)
        if tmp.is_dir() and (path.exists() or path.is_symlink()):
            aside = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(aside)
            os.replace(path, aside)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            _remove(aside)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        _WRITING.discard(tmp.absolute())
        _remove(tmp)


class DiskWriteback:
    """Sends a file being written to disk while it is still being written: `wrote()` after each
    large write flushes Python's buffer and wakes a thread that fdatasyncs the file. Without it
    the kernel keeps gigabytes of a large output dirty in memory, and atomic_path's fsync before
    the rename waits for all of it at the end (an 8.5 GB GGUF); with it that fsync waits only
    for the last writes. Use as a context manager around the writes. A failed sync (a full or
    failing disk) is raised, naming the file, by the next wrote() or at exit."""

    def __init__(self, file):
        self.file, self.fd, self.error, self.stopping = file, file.fileno(), None, False
        self.more = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def wrote(self):
        self._raise_error()
        self.file.flush()
        self.more.set()

    def _raise_error(self):
        if self.error is not None:  # the OSError again, with the file's name (the thread's had none)
            raise OSError(self.error.errno, self.error.strerror, self.file.name) from self.error

    def _run(self):
        sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
        while True:
            self.more.wait()
            self.more.clear()
            if self.stopping:
                return
            try:
                sync(self.fd)
            except OSError as e:
                self.error = e
                return

    def __exit__(self, *exc):
        self.stopping = True
        self.more.set()
        self.thread.join()
        if exc[0] is None:
            self._raise_error()


def clean_leftovers(folder):
    """Remove the temporary names a killed writer left in `folder`; an old output left aside
    by a kill between the two renames goes back to its name when nothing took its place.
    Names of a process still running (another writer) are left alone."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        match = LEFTOVER.match(entry.name)
        if not match or entry.absolute() in _WRITING or (int(match["pid"]) != os.getpid()
                                                          and _alive(int(match["pid"]))):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
            os.replace(entry, target)
        else:
            _remove(entry)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # someone else's process (or no such pid at all)
    return True


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path):
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(root)
    elif path.exists():
        _fsync_file(path)


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
