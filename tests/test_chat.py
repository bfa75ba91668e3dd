"""nanolora.chat: piped turns answered in order, each with the conversation so far, checked
against transformers' greedy generation on transformers' rendering of the same conversation."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fixtures import save_checkpoint
from nanolora import chat
from test_data import CHATML_TEMPLATE
from tok_fixtures import make_bpe_tokenizer_dir, write_generation_eos

MAX_NEW = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    save_checkpoint(path, "qwen2", seed=3)
    make_bpe_tokenizer_dir(path, chat_template=CHATML_TEMPLATE)
    write_generation_eos(path, [481, 486])
    return path


def transformers_reply(model_dir, messages):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=[481, 486])
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_piped_turns_match_transformers(model_dir):
    lines = ["Hello there", "And then?", "/reset", "Hello there", "/quit", "never read"]
    out = io.StringIO()
    args = ["--temperature", "0", "--max_new_tokens", str(MAX_NEW), "--device", "cpu"]
    messages = chat.main([str(model_dir), *args], stdin=io.StringIO("\n".join(lines) + "\n"), out=out)
    first = transformers_reply(model_dir, [{"role": "user", "content": "Hello there"}])
    second = transformers_reply(model_dir, [{"role": "user", "content": "Hello there"},
                                            {"role": "assistant", "content": first},
                                            {"role": "user", "content": "And then?"}])
    assert first and second and first != second
    assert out.getvalue() == f"{first}\n{second}\n(new conversation)\n{first}\n"
    assert messages == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first}]


def test_sampling_is_seeded_and_streamed_text_is_the_reply(model_dir):
    args = [str(model_dir), "--temperature", "1.5", "--top_p", "0.95", "--max_new_tokens", "24", "--device", "cpu"]
    runs = [io.StringIO(), io.StringIO(), io.StringIO()]
    replies = [chat.main(args + extra, stdin=io.StringIO("Hi\n"), out=o)[-1]["content"]
               for extra, o in zip(([], [], ["--seed", "1"]), runs)]
    assert replies[0] == replies[1] != replies[2]
    assert all(o.getvalue() == r + "\n" for o, r in zip(runs, replies))


def test_command_line_with_piped_stdin(model_dir):
    result = subprocess.run([sys.executable, "-m", "nanolora.chat", str(model_dir), "--temperature", "0",
                             "--max_new_tokens", str(MAX_NEW), "--device", "cpu"], input="Hello there\n",
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout == transformers_reply(model_dir, [{"role": "user", "content": "Hello there"}]) + "\n"
    bad = subprocess.run([sys.executable, "-m", "nanolora.chat", str(model_dir), "--top_p", "0"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and "0 < --top_p <= 1" in bad.stderr
