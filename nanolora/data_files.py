"""Where training rows come from: a .jsonl, .json or .parquet file, a folder of such files, or
a dataset on the Hugging Face hub. Each row comes with the place it was read from ("f.jsonl:
line 7", "f.parquet: row 7", counting from 1), which every error about it names.

A .jsonl file may be gzip-compressed (.jsonl.gz, or by its content); it must be UTF-8
(a byte order mark is skipped; UTF-16 is refused by name). A .json file holds an array of
rows (or, as many hub datasets do under that suffix, one row per line). A .parquet file needs pyarrow (`pip install pyarrow`), imported only when one is
read. A folder is read file by file in sorted order, sub-folders included. `split` picks the
files of one split the way hub datasets name them: a file or folder called "train", or a file
starting "train-" / "train_" / "train." (data/train-00000-of-00001.parquet, test.jsonl,
train/part1.json). Without a split, a folder whose files name a "train" split gives those;
otherwise every file.
"""
import gzip
import json
import re
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".parquet")
# files a saved or downloaded dataset folder holds beside its rows
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


def read_rows(source, split: str = ""):
    """Yield (where, row) for every row of `source` (a file, a folder, or a hub dataset id)."""
    for file in data_files(source, split):
        rows = _parquet_rows(file) if file.suffix == ".parquet" else _json_rows(file) if file.suffix == ".json" \
            else _jsonl_rows(file)
        for where, row in rows:
            bad = _first_unencodable(row)
            if bad is not None:
                raise ValueError(f"{where} holds a lone surrogate escape ({bad!r}), which is not text")
            yield where, row


def data_files(source, split: str = "") -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES and not path.name.endswith(".jsonl.gz"):
            raise ValueError(f"{path}: not a data file (expected {', '.join(SUFFIXES)})")
        if split:
            raise ValueError(f"--data_split {split!r} picks files in a folder or hub dataset; {path} is one file")
        return [path]
    if path.is_dir():
        root = path
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith(".") \
            and path.suffix not in SUFFIXES:  # "data/chats.jsonl" is a missing file, not a dataset
        root = _download_dataset(str(source))
    else:
        raise FileNotFoundError(f"{source}: no such file or folder, and not a hub dataset id like 'org/name'")
    files = sorted(f for f in root.rglob("*") if f.suffix in SUFFIXES and f.is_file() and f.name not in METADATA_FILES
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    if not files:
        raise ValueError(f"{source}: no {', '.join(SUFFIXES)} files in {root}")
    chosen = [f for f in files if _in_split(f.relative_to(root), split or "train")]
    if split and not chosen:
        splits = sorted({part for f in files for part in _split_names(f.relative_to(root))})
        raise ValueError(f"{source}: no files of split {split!r} (splits seen: {', '.join(splits) or 'none'})")
    return chosen or files


def _split_names(relative: Path) -> list[str]:
    """The names a file's path could be giving its split: its folders and its stem's head."""
    return [*relative.parts[:-1], re.split(r"[-_.]", relative.name)[0]]


def _in_split(relative: Path, split: str) -> bool:
    return split in relative.parts[:-1] or relative.stem == split or re.match(rf"{re.escape(split)}[-_.]", relative.name)


def _download_dataset(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in SUFFIXES]))
    except Exception as e:  # offline, unknown repo, gated, network: all mean "cannot get it"
        raise FileNotFoundError(f"{repo_id}: not a local file or folder, and the Hugging Face hub could not "
                                f"provide it as a dataset ({type(e).__name__}: {e})") from None


def _jsonl_rows(file: Path):
    """(where, row) for each non-blank line, read as bytes: each line's UTF-8 and JSON errors
    name the line; gzip is read through, UTF-16 / UTF-32 refused by name."""
    with open(file, "rb") as f:
        start = f.read(4)
    if start.startswith(b"\xff\xfe") or start.startswith(b"\xfe\xff") or (len(start) == 4 and start[1::2] == b"\0\0"):
        raise ValueError(f"{file}: the file is UTF-16 or UTF-32; save it as UTF-8 JSONL")
    opener = gzip.open if start.startswith(b"\x1f\x8b") else open
    with opener(file, "rb") as f:
        try:
            for line_number, raw in enumerate(f, start=1):
                if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{file}: line {line_number} is not valid UTF-8 (byte {raw[e.start]:#04x} "
                                     f"at byte {e.start + 1})") from None
                if line.strip():
                    yield f"{file}: line {line_number}", _parse(line, f"{file}: line {line_number}")
        except (EOFError, OSError) as e:
            if opener is open:
                raise
            raise ValueError(f"{file}: the gzip data is damaged or cut short ({e})") from None


def _parse(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None


def _first_unencodable(value, depth=0):
    """The first string in a parsed row that is not valid Unicode (a lone surrogate such as
    "\\ud800", which JSON allows as an escape), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return value[max(e.start - 8, 0):e.end + 8]
    elif isinstance(value, (list, dict)) and depth < 64:
        for item in (value.values() if isinstance(value, dict) else value):
            found = _first_unencodable(item, depth + 1)
            if found is not None:
                return found
    return None


def _json_rows(file: Path):
    try:
        rows = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not valid UTF-8 (byte {e.object[e.start]:#04x} at byte {e.start + 1})") from None
    except RecursionError:
        raise ValueError(f"{file}: nested too deeply") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: one row per line
            yield from _jsonl_rows(file)
            return
        raise ValueError(f"{file}: not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{file}: expected an array of rows (or one row per line), got a JSON {type(rows).__name__}")
    for i, row in enumerate(rows, start=1):
        yield f"{file}: row {i}", row


def _parquet_rows(file: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{file}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    from pyarrow import ArrowException
    n = 0
    try:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):  # a file larger than memory streams
            for row in batch.to_pylist():
                n += 1  # a column a row does not use holds null there: drop it, as if absent
                yield f"{file}: row {n}", {key: value for key, value in row.items() if value is not None}
    except (OSError, ArrowException) as e:
        raise ValueError(f"{file}: not a readable parquet file ({e})") from None
