"""data.py: masks checked token by token against pieces tokenized here (and against
transformers' assistant masks for chat templates), errors, truncation, padding, packing,
shuffling and resume."""
import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanolora.data import (Batches, Example, collate, encode_row, load_examples, pack_examples, pad_token_id,
                           split_eval)
from nanolora.tokenizer import Tokenizer
from tok_fixtures import make_bpe_tokenizer_dir, make_sentencepiece_dir, write_generation_eos

DEVILS_DICTIONARY = Path(__file__).parents[1] / "data" / "devils_dictionary.jsonl"

# Llama-3's layout; {% generation %} marks what transformers' return_assistant_tokens_mask reports
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# ChatML: the "\n" after <|im_end|> belongs to the turn but is never generated
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# no end-of-turn token at all: data.py must end each assistant turn with EOS itself
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there, how are you?"},
    {"role": "assistant", "content": "I'm fine, thanks."},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "A low-rank adapter."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):  # no chat template
    return Tokenizer.from_dir(make_bpe_tokenizer_dir(tmp_path_factory.mktemp("plain")))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return make_bpe_tokenizer_dir(tmp_path_factory.mktemp("llama3"), chat_template=LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def llama3_tok(llama3_dir):
    return Tokenizer.from_dir(llama3_dir)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    path = make_bpe_tokenizer_dir(tmp_path_factory.mktemp("chatml"), chat_template=CHATML_TEMPLATE)
    write_generation_eos(path, [481, 486])  # <|end_of_text|>, <|im_end|> (as Qwen instruct models list theirs)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def expected(tok, pieces):
    """ids and labels from (text, labelled) pieces, each tokenized here without special tokens;
    the first token is never labelled."""
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if labelled else [-100] * len(piece)
    return ids, [-100] + labels[1:]


def test_text_labels_every_token_and_ends_with_eos(tok):
    text = "The quick brown fox jumps."
    example = encode_row({"text": text}, tok)
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert example.input_ids == ids
    assert example.labels == [-100] + ids[1:]


def test_prompt_completion_masks_the_prompt(tok):
    prompt, completion = "User: what is LoRA? Assistant:", " a low-rank adapter."
    example = encode_row({"prompt": prompt, "completion": completion}, tok)
    prompt_ids = tok.encode(prompt)  # with BOS
    completion_ids = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
    assert prompt_ids[0] == tok.bos_token_id
    assert example.input_ids == prompt_ids + completion_ids
    assert example.labels == [-100] * len(prompt_ids) + completion_ids

    everything = encode_row({"prompt": prompt, "completion": completion}, tok, train_on_prompt=True)
    assert everything.input_ids == example.input_ids
    assert everything.labels == [-100] + example.input_ids[1:]


@pytest.mark.parametrize("extra", ["", "Café au lait"])
def test_alpaca_without_chat_template(tok, extra):
    row = {"instruction": "Define the word \"fox\".", "input": extra, "output": "FOX, n. A quick animal."}
    if extra:
        prompt = ("The instruction below describes a task, and the input gives it context. Write a response that "
                  "carries it out.\n\n### Instruction:\nDefine the word \"fox\".\n\n### Input:\nCafé au lait\n\n"
                  "### Response:\n")
    else:
        prompt = ("The instruction below describes a task. Write a response that carries it out.\n\n"
                  "### Instruction:\nDefine the word \"fox\".\n\n### Response:\n")
    example = encode_row(row, tok)
    prompt_ids = tok.encode(prompt)
    output_ids = tok.encode(row["output"], add_special_tokens=False) + [tok.eos_token_id]
    assert example.input_ids == prompt_ids + output_ids
    assert example.labels == [-100] * len(prompt_ids) + output_ids


def test_alpaca_missing_input_is_empty_input(tok):
    row = {"instruction": "Say hi.", "output": "Hi."}
    assert encode_row(row, tok) == encode_row({**row, "input": ""}, tok) == encode_row({**row, "input": None}, tok)


def test_alpaca_with_chat_template_is_a_conversation(llama3_tok):
    row = {"instruction": "Define fox.", "input": "Be brief.", "output": "FOX, n. An animal."}
    example = encode_row(row, llama3_tok)
    ids, labels = expected(llama3_tok, [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDefine fox.\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("FOX, n. An animal.<|eot_id|>", True)])
    assert example.input_ids == ids and example.labels == labels
    assert example.input_ids[-1] == llama3_tok.token_to_id("<|eot_id|>")  # the template's end, no EOS added


def test_messages_llama3_token_by_token(llama3_tok):
    example = encode_row({"messages": CONVERSATION}, llama3_tok)
    ids, labels = expected(llama3_tok, [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHello there, how are you?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("I'm fine, thanks.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nWhat is LoRA?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("A low-rank adapter.<|eot_id|>", True)])
    assert example.input_ids == ids
    assert example.labels == labels


def test_messages_chatml_labels_im_end_not_the_newline(chatml_dir):
    chatml_tok = Tokenizer.from_dir(chatml_dir)
    example = encode_row({"messages": CONVERSATION[1:3]}, chatml_tok)
    ids, labels = expected(chatml_tok, [
        ("<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\n", False),
        ("I'm fine, thanks.<|im_end|>", True),
        ("\n", False)])
    assert example.input_ids == ids and example.labels == labels


def test_messages_without_end_token_get_eos(tmp_path):
    plain_tok = Tokenizer.from_dir(make_bpe_tokenizer_dir(tmp_path, chat_template=PLAIN_TEMPLATE))
    example = encode_row({"messages": CONVERSATION[1:3]}, plain_tok)
    eos = plain_tok.eos_token_id
    prompt = plain_tok.encode("user: Hello there, how are you?\nassistant: ", add_special_tokens=False)
    answer = plain_tok.encode("I'm fine, thanks.\n", add_special_tokens=False) + [eos]
    assert example.input_ids == prompt + answer
    assert example.labels == [-100] * len(prompt) + answer


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_messages_match_transformers_assistant_mask(which, llama3_dir, chatml_dir):
    """transformers' apply_chat_template(return_assistant_tokens_mask=True) marks the tokens inside
    {% generation %}: the same ids, and the same positions labelled."""
    from transformers import AutoTokenizer
    folder = llama3_dir if which == "llama3" else chatml_dir
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    example = encode_row({"messages": CONVERSATION}, Tokenizer.from_dir(folder))
    assert example.input_ids == list(reference["input_ids"])
    assert [int(label != -100) for label in example.labels] == list(reference["assistant_masks"])


def test_messages_pieces_equal_whole_rendering(llama3_tok, chatml_dir):
    """The pieces are tokenized one by one; for ordinary content that equals tokenizing the whole
    rendered conversation (the caveat in _encode_conversation's docstring)."""
    for t in (llama3_tok, Tokenizer.from_dir(chatml_dir)):
        for messages in (CONVERSATION, CONVERSATION[:3], CONVERSATION[1:4]):
            whole = t.encode(t.apply_chat_template(messages), add_special_tokens=False)
            assert encode_row({"messages": messages}, t).input_ids == whole


def test_messages_train_on_prompt(llama3_tok):
    example = encode_row({"messages": CONVERSATION}, llama3_tok, train_on_prompt=True)
    assert example.labels == [-100] + example.input_ids[1:]


def test_messages_need_a_chat_template(tok, tmp_path):
    with pytest.raises(ValueError, match="no chat template"):
        encode_row({"messages": CONVERSATION}, tok)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "ok"}, {"messages": CONVERSATION}])
    with pytest.raises(ValueError, match=r"chat.jsonl: line 2: .*no chat template"):
        load_examples(path, tok, seq_len=64)


def test_tokenizer_that_adds_eos_gets_one_eos(tmp_path):
    """A tokenizer set to add_eos_token puts EOS after any text; the prompt must not end with it."""
    sp_tok = Tokenizer.from_dir(make_sentencepiece_dir(tmp_path, add_eos_token=True))
    bos, eos = sp_tok.bos_token_id, sp_tok.eos_token_id
    assert sp_tok.encode("Hello world")[-1] == eos
    example = encode_row({"prompt": "Hello", "completion": " world"}, sp_tok)
    prompt = [bos] + sp_tok.encode("Hello", add_special_tokens=False)
    completion = sp_tok.encode(" world", add_special_tokens=False) + [eos]
    assert example.input_ids == prompt + completion
    assert example.labels == [-100] * len(prompt) + completion
    assert encode_row({"text": "Hello world"}, sp_tok).input_ids == sp_tok.encode("Hello world")


def test_load_counts_truncated_and_skipped(tok, tmp_path):
    rows = [{"text": "short"},
            {"text": "The quick brown fox jumps over the lazy dog. " * 10},                  # truncated, kept
            {"prompt": "Hello world, hello there. " * 10, "completion": " fine"},          # truncated, no labels
            {"prompt": "How are you?", "completion": "Fine."}]
    examples, stats = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, seq_len=16)
    assert (stats.n_examples, stats.n_truncated, stats.n_skipped) == (3, 1, 1)
    assert stats.formats == {"text": 2, "prompt_completion": 2}
    assert all(len(ex.input_ids) <= 16 for ex in examples)
    long_ids = tok.encode(rows[1]["text"])
    assert examples[1].input_ids == long_ids[:16]  # the first seq_len tokens
    assert stats.n_tokens == sum(len(ex.input_ids) for ex in examples)
    assert "3 examples" in str(stats) and "1 truncated" in str(stats) and "1 skipped: no label tokens" in str(stats)


def test_malformed_line_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", '{"text": "unterminated'])
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3 is not valid JSON"):
        load_examples(path, tok, seq_len=64)


def test_unknown_format_names_keys_and_formats(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"text": "a"}, {"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as error:
        load_examples(path, tok, seq_len=64)
    message = str(error.value)
    assert "qa.jsonl: line 2" in message and "['answer', 'question']" in message
    assert all(key in message for key in ('"messages"', '"prompt"', '"completion"', '"instruction"', '"text"'))
    with pytest.raises(ValueError, match="line 1: .*not an object"):
        load_examples(write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"]), tok, seq_len=64)


def test_empty_dataset_errors(tok, tmp_path):
    for rows in ([], ["", "  "]):
        path = write_jsonl(tmp_path / "empty.jsonl", rows)
        with pytest.raises(ValueError, match=r"empty.jsonl: no training examples: it has no rows"):
            load_examples(path, tok, seq_len=64)
    path = write_jsonl(tmp_path / "masked.jsonl", [{"prompt": "Hello world " * 20, "completion": "x"}])
    with pytest.raises(ValueError, match=r"masked.jsonl: no training examples: all 1 rows have no label"):
        load_examples(path, tok, seq_len=8)


def test_padding(tok):
    short, long = Example([1, 2, 3], [-100, 2, 3]), Example([4, 5, 6, 7, 8], [-100, -100, 6, 7, 8])
    batch = collate([[short], [long]], pad_id=pad_token_id(tok), packed=False)
    pad = tok.pad_token_id
    assert all(t.dtype == torch.long and t.device.type == "cpu" for k, t in batch.items() if t is not None)
    assert batch["segment_ids"] is None
    assert batch["input_ids"].tolist() == [[1, 2, 3, pad, pad], [4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"][:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def numbered_examples(n, seed=0):
    """Distinct examples (the first id numbers them) of random lengths, every token labelled."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        ids = [1000 + i] + [rng.randrange(500) for _ in range(rng.randrange(1, 20))]
        examples.append(Example(ids, [-100] + ids[1:]))
    return examples


def segments(batch):
    """The examples of a packed batch, as input_id tuples, read back through segment_ids."""
    found = []
    for row, seg in zip(batch["input_ids"].tolist(), batch["segment_ids"].tolist()):
        for k in range(1, max(seg) + 1):
            found.append(tuple(t for t, s in zip(row, seg) if s == k))
    return found


def test_packing():
    examples, seq_len = numbered_examples(40), 32
    batches = Batches(examples, batch_size=3, pad_id=0, seed=1, pack=True, seq_len=seq_len)
    assert len(batches) == -(-len(batches.rows) // 3) and len(batches.rows) < len(examples)
    for epoch in range(2):
        seen = []
        for batch in batches:
            ids, labels, seg, pos = (batch[k] for k in ("input_ids", "labels", "segment_ids", "position_ids"))
            assert ids.shape[1] <= seq_len
            assert torch.equal(batch["attention_mask"], (seg > 0).long())
            for r in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    start = seg[r, t] > 0 and (t == 0 or seg[r, t] != seg[r, t - 1])
                    if start:  # a new example: positions restart and its first token is no target
                        assert pos[r, t] == 0 and labels[r, t] == -100
                    elif seg[r, t] > 0:
                        assert pos[r, t] == pos[r, t - 1] + 1 and seg[r, t] == seg[r, t - 1]
                        assert labels[r, t] == ids[r, t]
                    else:
                        assert labels[r, t] == -100 and ids[r, t] == 0
            seen += segments(batch)
        assert Counter(seen) == Counter(tuple(ex.input_ids) for ex in examples)  # each once per epoch
        assert batches.epoch == epoch + 1


def test_packing_labels_at_segment_start_even_if_example_labels_it():
    a, b = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5])
    batch = collate(pack_examples([a, b], seq_len=8), pad_id=0, packed=True)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert pack_examples([a, b, a], seq_len=5) == [[a, b], [a]]


def first_ids(batch):
    return batch["input_ids"][:, 0].tolist()


@pytest.mark.parametrize("group", [False, True])
def test_every_example_once_per_epoch_and_shuffle_per_seed_and_epoch(group):
    examples = numbered_examples(25)
    batches = Batches(examples, batch_size=4, pad_id=0, seed=3, group_by_length=group)
    assert len(batches) == 7
    epochs = [[i for batch in batches for i in first_ids(batch)] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == [1000 + i for i in range(25)]
    assert epochs[0] != epochs[1] != epochs[2]
    again = Batches(examples, batch_size=4, pad_id=0, seed=3, group_by_length=group)
    assert [i for b in again for i in first_ids(b)] == epochs[0]  # a fixed function of (seed, epoch)
    assert [i for b in Batches(examples, 4, 0, seed=4, group_by_length=group) for i in first_ids(b)] != epochs[0]
    assert first_ids(again.batch(2, 1)) == epochs[2][4:8]


def test_group_by_length_pads_less_and_keeps_the_short_batch_last():
    examples = numbered_examples(203, seed=1)
    def padding(batches):
        tokens = [b["attention_mask"] for epoch in range(3) for b in batches]
        return 1 - sum(int(m.sum()) for m in tokens) / sum(m.numel() for m in tokens)
    plain, grouped = Batches(examples, 4, 0, seed=2), Batches(examples, 4, 0, seed=2, group_by_length=True)
    assert padding(grouped) < padding(plain) / 4
    assert [len(b["input_ids"]) for b in grouped][-1] == 3  # 203 = 50 * 4 + 3
    lengths = [b["attention_mask"].sum(1).tolist() for b in grouped]
    assert sorted(lengths) != lengths  # the batches themselves are shuffled, not sorted


@pytest.mark.parametrize("pack, group", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("n_used", [1, 6, 7, 10, 20])
def test_resume_continues_at_the_next_batch(pack, group, n_used):
    examples = numbered_examples(25)
    make = lambda: Batches(examples, batch_size=4, pad_id=0, seed=5, pack=pack, seq_len=32,  # noqa: E731
                           group_by_length=group)
    run = make().forever()
    first = make()
    stream = first.forever()
    for _ in range(n_used):
        next(stream)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    expected_next = [next(stream) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for want, got in zip(expected_next, resumed.forever()):
        assert torch.equal(want["input_ids"], got["input_ids"]) and torch.equal(want["labels"], got["labels"])
    # and the uninterrupted run saw the same batches
    for _ in range(n_used):
        next(run)
    assert torch.equal(next(run)["input_ids"], expected_next[0]["input_ids"])


def test_resume_refuses_a_different_order():
    batches = Batches(numbered_examples(25), batch_size=4, pad_id=0, seed=5)
    with pytest.raises(ValueError, match="cannot resume"):
        Batches(numbered_examples(25), batch_size=5, pad_id=0, seed=5).load_state_dict(batches.state_dict())


def test_split_eval():
    examples = numbered_examples(50)
    train, held_out = split_eval(examples, 5, seed=0)
    assert len(held_out) == 5 and len(train) == 45
    assert sorted(train + held_out) == sorted(examples)
    assert split_eval(examples, 5, seed=0) == (train, held_out)
    assert split_eval(examples, 5, seed=1)[1] != held_out
    assert len(split_eval(examples, 0.1, seed=0)[1]) == 5
    assert train == [ex for ex in examples if ex in train]  # file order kept
    with pytest.raises(ValueError):
        split_eval(examples, 50)


def test_devils_dictionary_parses_as_alpaca_with_labels_on_outputs(tok):
    examples, stats = load_examples(DEVILS_DICTIONARY, tok, seq_len=1_000_000)
    rows = [json.loads(line) for line in DEVILS_DICTIONARY.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == stats.n_examples == len(examples) == 975
    assert stats.formats == {"alpaca": 975} and stats.n_truncated == stats.n_skipped == 0
    for row, example in zip(rows, examples):
        output = tok.encode(row["output"], add_special_tokens=False) + [tok.eos_token_id]
        n_prompt = len(example.input_ids) - len(output)
        assert example.input_ids[n_prompt:] == output
        assert example.labels == [-100] * n_prompt + output


def test_messages_pieces_differ_from_whole_string_only_at_a_cut(chatml_dir):
    """The documented caveat: a reply starting with the whitespace its header ends with. The pieces
    keep "assistant\\n" + "\\nHello" apart (as at inference); the whole string merges "\\n\\n"."""
    chatml_tok = Tokenizer.from_dir(chatml_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    example = encode_row({"messages": messages}, chatml_tok)
    ids, labels = expected(chatml_tok, [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
                                        ("\nHello<|im_end|>", True), ("\n", False)])
    assert example.input_ids == ids and example.labels == labels
    whole = chatml_tok.encode(chatml_tok.apply_chat_template(messages), add_special_tokens=False)
    assert whole != ids and chatml_tok.decode(whole) == chatml_tok.decode(ids)
