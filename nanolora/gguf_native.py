"""The native GGUF quantizer (nanolora/gguf_quantize.c): compiled on first use, loaded with ctypes.

Why C, compiled here: the K-quants' search is a long chain of small float32 operations per
sub-block, which torch runs op by op (its dispatch, and the GIL between ops, cost more than the
arithmetic); in C it runs 16 sub-blocks to a SIMD lane set, 4-8x faster than llama.cpp's own
scalar loops (gguf_quantize.c's header). A C compiler is already a run-time need: Triton builds
its launchers with `cc`. The file uses no Python or torch headers, so it compiles in about a
second, with -march=native (it runs where it was built), and ctypes releases the GIL during a
call, so plain Python threads share the rows out as llama.cpp's threads do.

The library is cached per user (XDG_CACHE_HOME or ~/.cache, then nanolora/) under a name that
hashes the source, the flags and what the compiler says it targets, and is written under a
temporary name and renamed, so that two processes compiling at once never load half a file,
and ends with a sha256 of itself, checked before loading (a damaged file is compiled again).
Without a compiler, if compiling fails, or with NANOLORA_NATIVE=0, library() returns None and
says why in one line on stderr: the torch quantizers (the same bytes, slower) are used instead.
"""
import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("gguf_quantize.c")
# no -ffast-math (it reorders float operations), no FMA contraction: the bytes must be llama.cpp's.
# -fno-math-errno lets sqrtf be one vector instruction (errno is never read here; the values are the same)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math", "-std=c11",
         "-shared", "-fPIC"]
SOURCES = ("float32", "float16", "bfloat16")  # the `src` codes the C entry points take
TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_lock = threading.Lock()
_loaded = {}  # "lib": the CDLL, or None once it failed (said once)


def library():
    """The compiled quantizers (a ctypes.CDLL with nanolora_quantize_<type>(const void *x,
    int source, int64 n_blocks, uint8 *out) for TYPES, x in SOURCES[source]'s dtype), or None:
    see the module docstring."""
    if os.environ.get("NANOLORA_NATIVE", "1") == "0":
        return _unavailable("NANOLORA_NATIVE=0")
    with _lock:
        if "lib" not in _loaded:
            try:
                _loaded["lib"] = _load()
            except NativeUnavailable as e:
                _loaded["lib"] = _unavailable(str(e))
        return _loaded["lib"]


class NativeUnavailable(Exception):
    pass


_said = set()


def _unavailable(reason):
    """None, having said why on stderr (once per reason and process)."""
    if reason not in _said:
        _said.add(reason)
        print(f"nanolora: the native GGUF quantizer is off ({reason}); quantizing with torch instead "
              f"(same bytes, slower)", file=sys.stderr)
    return None


def _load():
    compiler = shlex.split(os.environ.get("CC") or "cc")  # CC may carry words: "ccache gcc"
    if not compiler or shutil.which(compiler[0]) is None:
        raise NativeUnavailable(f"no C compiler found (CC={' '.join(compiler) or 'cc'}: set CC, or install gcc or clang)")
    path = cache_folder() / f"gguf_quantize-{_build_key(compiler)}.so"
    if _intact(path):
        try:
            return _declare(ctypes.CDLL(str(path)))
        except (OSError, AttributeError):  # not a library of ours after all: build it again
            pass
    _compile(compiler, path)
    try:
        return _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:
        raise NativeUnavailable(f"the compiled {path} does not load ({e})") from None


def _intact(path: Path) -> bool:
    """Whether `path` ends with the sha256 of the bytes before it, as _compile writes it (the
    loader ignores bytes past the library's segments). A damaged file must not reach dlopen:
    one cut short crashes the process (SIGBUS) when its mapped pages past the end are read."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) > 32 and hashlib.sha256(data[:-32]).digest() == data[-32:]


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanolora"


def _build_key(compiler):
    """A hash of the source, the flags, and the macros the compiler predefines with those flags
    (`-E -dM`: its version, and the instruction sets -march=native picked on this CPU)."""
    try:
        probe = subprocess.run([*compiler, *FLAGS, "-E", "-dM", "-x", "c", os.devnull],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"the C compiler {' '.join(compiler)} does not run ({e})") from None
    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(FLAGS), probe.stdout, probe.stderr, sys.platform):
        key.update(part.encode())
    return key.hexdigest()[:16]


def _compile(compiler, path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        os.close(handle)
    except OSError as e:
        raise NativeUnavailable(f"cannot write to the cache folder {path.parent} ({e.strerror})") from None
    try:
        try:
            result = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True,
                                    text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeUnavailable(f"compiling {SOURCE.name} with {' '.join(compiler)} failed ({e})") from None
        if result.returncode:
            lines = result.stderr.strip().splitlines() or ["no message"]
            first = next((line for line in lines if "error" in line), lines[-1])
            raise NativeUnavailable(f"compiling {SOURCE.name} with {' '.join(compiler)} failed: {first}")
        with open(temporary, "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(hashlib.sha256(Path(temporary).read_bytes()).digest())  # see _intact
        os.replace(temporary, path)  # atomic: another process sees the old name absent or the whole file
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _declare(lib):
    for type_name in TYPES:
        function = getattr(lib, f"nanolora_quantize_{type_name.lower()}")
        function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p]
        function.restype = None
    return lib
