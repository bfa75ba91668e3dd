"""Writing files so that nothing is lost: a crash or a full disk mid-write leaves the old
file (or none), never a truncated one."""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; rename it to `path` only if the block succeeds.

    Works for a file or a folder written at the temporary name. os.replace is atomic on one
    filesystem, and the temporary name is in the same folder, so it is on the same one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)  # a folder cannot be replaced in one step; drop the old one last
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
