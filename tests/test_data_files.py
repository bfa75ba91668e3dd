"""data_files.py and the ShareGPT format: the same rows read from .jsonl, .json, .parquet, a
folder and a (stand-in) hub dataset give the same examples; splits; errors name file and row."""
import json

import pytest

from nanolora import data_files
from nanolora.data import encode_row, load_examples
from nanolora.tokenizer import Tokenizer
from test_data import CHATML_TEMPLATE, CONVERSATION
from tok_fixtures import make_bpe_tokenizer_dir, write_generation_eos

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (an optional extra) reads .parquet")
import pyarrow as pa  # noqa: E402

ROWS = [{"prompt": "How are you?", "completion": "Fine."},
        {"prompt": "Name a colour.", "completion": "Blue, mostly."},
        {"prompt": "Two plus two?", "completion": "Four."}]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = make_bpe_tokenizer_dir(tmp_path_factory.mktemp("chatml"), chat_template=CHATML_TEMPLATE)
    write_generation_eos(path, [481, 486])
    return Tokenizer.from_dir(path)


def write(path, rows, kind=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = kind or path.suffix
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def ids_of(examples):
    return [(ex.input_ids, ex.labels) for ex in examples]


def test_sharegpt_rows_are_the_conversation(tok):
    sharegpt = {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in CONVERSATION]}
    assert encode_row(sharegpt, tok) == encode_row({"messages": CONVERSATION}, tok)
    assert encode_row(sharegpt, tok).labels != encode_row({"messages": CONVERSATION}, tok, train_on_prompt=True).labels


@pytest.mark.parametrize("suffix", [".json", ".parquet", "json-lines"])
def test_every_file_kind_gives_the_same_examples(tok, tmp_path, suffix):
    reference, _ = load_examples(write(tmp_path / "d.jsonl", ROWS), tok, seq_len=64)
    path = write(tmp_path / "d.json", ROWS, ".jsonl") if suffix == "json-lines" else write(tmp_path / f"d{suffix}", ROWS)
    examples, stats = load_examples(path, tok, seq_len=64)
    assert ids_of(examples) == ids_of(reference) and stats.n_examples == 3
    assert [ex.prompt for ex in examples] == [r["prompt"] for r in ROWS]


def test_parquet_with_nested_conversations(tok, tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    from_parquet, _ = load_examples(write(tmp_path / "chats.parquet", rows), tok, seq_len=256)
    from_jsonl, _ = load_examples(write(tmp_path / "chats.jsonl", rows), tok, seq_len=256)
    assert ids_of(from_parquet) == ids_of(from_jsonl)


def test_folder_and_splits(tok, tmp_path):
    root = tmp_path / "ds"
    write(root / "data" / "train-00000-of-00002.parquet", ROWS[:2])
    write(root / "data" / "train-00001-of-00002.parquet", ROWS[2:])
    write(root / "data" / "test-00000-of-00001.parquet", ROWS[:1])
    write(root / "validation.jsonl", ROWS[1:2])
    (root / "README.md").write_text("# a dataset card\n")
    (root / "dataset_info.json").write_text('{"features": {}}')
    (root / ".cache").mkdir()
    write(root / ".cache" / "junk.jsonl", [{"nonsense": 1}])
    default, _ = load_examples(root, tok, seq_len=64)  # no split: train, in sorted file order
    assert [ex.prompt for ex in default] == [r["prompt"] for r in ROWS]
    assert [ex.prompt for ex in load_examples(root, tok, 64, split="test")[0]] == [ROWS[0]["prompt"]]
    assert [ex.prompt for ex in load_examples(root, tok, 64, split="validation")[0]] == [ROWS[1]["prompt"]]
    with pytest.raises(ValueError, match=r"no files of split 'dev' \(splits seen: data, test, train, validation\)"):
        load_examples(root, tok, 64, split="dev")
    plain = tmp_path / "plain"  # no split names: every file
    write(plain / "a.jsonl", ROWS[:1])
    write(plain / "b" / "c.json", ROWS[1:])
    assert [ex.prompt for ex in load_examples(plain, tok, 64)[0]] == [r["prompt"] for r in ROWS]


def test_hub_dataset_id_downloads_a_dataset_snapshot(tok, tmp_path, monkeypatch):
    import huggingface_hub
    write(tmp_path / "snapshot" / "data" / "train.jsonl", ROWS)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    examples, _ = load_examples("someone/chats", tok, seq_len=64)
    assert len(examples) == 3
    assert calls[0][0] == "someone/chats" and calls[0][1]["repo_type"] == "dataset"

    def offline(repo_id, **kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"someone/chats: not a local file or folder, and the Hugging Face "
                                                r"hub could not provide it as a dataset \(ConnectionError"):
        load_examples("someone/chats", tok, seq_len=64)


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", json.dumps([ROWS[0], {"question": "q"}]), r"bad.json: row 2: a row with keys \['question'\]"),
    ("obj.json", json.dumps({"data": ROWS}), r"obj.json: expected an array of rows .*got a JSON dict"),
    ("broken.json", '[{"prompt": "a", ', r"broken.json: not valid JSON \(Expecting"),
    ("lines.json", json.dumps(ROWS[0]) + "\n{oops\n", r"lines.json: line 2 is not valid JSON"),
    ("share.jsonl", json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}),
     r"share.jsonl: line 1: \"conversations\" turn 1 has \"from\": 'bot'; expected one of system, human"),
    ("share2.jsonl", json.dumps({"conversations": [{"from": "human", "value": 3}]}),
     r"share2.jsonl: line 1: \"conversations\" turn 0: \"value\" must be a string, got int"),
    ("share3.jsonl", json.dumps({"conversations": "hi"}), r"share3.jsonl: line 1: \"conversations\" must be a list"),
    ("notes.txt", "hello", r"notes.txt: not a data file \(expected .jsonl, .json, .parquet\)"),
])
def test_unusable_input_names_file_and_row(tok, tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_examples(tmp_path / name, tok, seq_len=64)


def test_unusable_parquet_and_paths(tok, tmp_path):
    path = write(tmp_path / "rows.parquet", [*ROWS, {"prompt": None, "completion": None, "text": None}])
    with pytest.raises(ValueError, match=r"rows.parquet: row 4: "):  # a null-filled row in a column table
        load_examples(path, tok, seq_len=64)
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"corrupt.parquet: not a readable parquet file"):
        load_examples(tmp_path / "corrupt.parquet", tok, seq_len=64)
    with pytest.raises(FileNotFoundError, match=r"nowhere/at/all.jsonl: no such file or folder"):
        load_examples(tmp_path / "nowhere" / "at" / "all.jsonl", tok, seq_len=64)
    with pytest.raises(FileNotFoundError, match=r"^missing/chats.jsonl: no such file"):  # not taken for a dataset id
        load_examples("missing/chats.jsonl", tok, seq_len=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no .jsonl, .json, .parquet files"):
        load_examples(tmp_path / "empty", tok, seq_len=64)
    with pytest.raises(ValueError, match=r"--data_split 'train' picks files in a folder"):
        list(data_files.read_rows(write(tmp_path / "one.jsonl", ROWS), split="train"))


def test_parquet_without_pyarrow_says_how_to_get_it(tok, tmp_path, monkeypatch):
    import builtins
    path = write(tmp_path / "d.parquet", ROWS)
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match=r"d.parquet: reading .parquet files needs pyarrow \(pip install pyarrow\)"):
        load_examples(path, tok, seq_len=64)
