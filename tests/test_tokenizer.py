"""nanolora.tokenizer against transformers' AutoTokenizer on the same folders.

Every expected value comes from transformers (or the folder's own generation_config.json),
never from nanolora. The folders are trained by tests/tok_fixtures.py: a Llama-3-style
byte-level BPE tokenizer.json, Llama-2-style sentencepiece folders (BPE and unigram, with
and without tokenizer.json), so encode/decode, special tokens and chat templates are
checked on both backends.
"""
import json
import shutil

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tok_fixtures import (make_bpe_tokenizer_dir, make_llama2_tokenizer_json_dir, make_sentencepiece_dir,
                          write_chat_template)
from tokenizers import Tokenizer as RawTokenizer

from nanolora.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
try:
    import google.protobuf  # noqa: F401  (transformers reads a sentencepiece model with it)
    HAS_PROTOBUF = True
except ImportError:
    HAS_PROTOBUF = False
needs_protobuf = pytest.mark.skipif(not HAS_PROTOBUF,
                                    reason="transformers needs protobuf to read tokenizer.model")

TEXTS = [
    "Hello world", "Hello world!", " leading space", "   three leading spaces", "trailing space ",
    "tabs\tand\ttabs", "line one\nline two\r\nline three\n\n\n", "a  b   c    d     e",
    "12345 3.14 -0.5e10 1,000,000 2024-06-01", "Café naïve résumé über façade Ångström",
    "日本語のテキスト 中文 한국어", "emoji 😀🎉 👍🏽 ❤️ 👨‍👩‍👧",
    "ÀÉÎÕÜ ẞ ﬁ ½ ² ∮ ⅋ 𝔘𝔫𝔦 \u200b zero width",
    "mixed 中文and English123", "don't I'm we'll they're it's", "spaced , . ! ? it 's I 'm isn 't",
    "def f(x):\n    return x ** 2  # square",
    "", " ", "\n", "\t",
    # special and added tokens written in the text: each becomes its single id
    "<|begin_of_text|>Hello<|eot_id|>", "<|im_start|>user\nhi<|im_end|>\n", "<|eot_id|><|eot_id|> x",
    "x<think>y</think>z", "<s>Hello</s> world <unk>", "<s> [INST] hi [/INST] ok</s><s>[INST] again",
    "a<sep>b <sep> c<cls>",
]

CHATML = """\
{%- if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

LLAMA3 = """\
{{- bos_token }}
{%- if date_string is not defined %}{% set date_string = strftime_now("%Y") %}{% endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and message['role'] == 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\nDate: ' + date_string + '\\n' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- endif %}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# loop.last, tojson (non-ASCII, HTML characters, indent), namespace, {% continue %} / {% break %},
# indented block tags (lstrip_blocks), tools and extra kwargs, {% generation %}, reasoning
# aliases and dropped None values
TOOLS_JSON = """\
{% set ns = namespace(n=0) %}
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
{{ ns.n }}. {{ message.role }}: {{ message.content | tojson }}
{%- if message.reasoning_content is defined %} [thinking: {{ message.reasoning_content }}]{% endif %}
{%- if message.tool_calls is defined %} CALLS {{ message.tool_calls | tojson(indent=2) }}{% endif %}
{% if message.role == 'assistant' %}{% generation %} <{{ eos_token }}>{% endgeneration %}{% endif %}
{% if not loop.last %} ---
{% endif %}
{% if message.content == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}assistant ({{ persona | default('plain') }}):{% endif %}
"""

LLAMA2 = """\
{% for message in messages %}
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}
{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}
{% endif %}
{% endfor %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief. Café ☕"},
     {"role": "user", "content": "  What is 12345 + 3.14?\n"},
     {"role": "assistant", "content": "12348.14 <tag> & \"quotes\" 日本"},
     {"role": "user", "content": "Say <|eot_id|> literally, then STOP"}],
    [{"role": "user", "content": "call a tool", "tool_calls": None},
     {"role": "assistant", "content": "ok", "reasoning": "the user wants a tool",
      "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": "é<>"}}]},
     {"role": "skip", "content": "skipped by {% continue %}"},
     {"role": "user", "content": "STOP"},
     {"role": "user", "content": "never reached"}],
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b → sum", "parameters": {}}}]


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path)


def assert_same_special_tokens(hf, ours):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id"):
        assert getattr(ours, name) == getattr(hf, name), name


def assert_same_tokens(folder, texts=TEXTS):
    """ids with and without special tokens, decode (skipping special tokens or not), vocab size,
    and the added-token table all equal transformers'."""
    hf, ours = hf_tokenizer(folder), Tokenizer.from_dir(folder)
    for text in texts:
        for add_special_tokens in (True, False):
            expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens) == expected, (text, add_special_tokens)
        ids = hf(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    assert len(ours) == len(hf)

    def table(tok):
        return {i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
                for i, t in tok.get_added_tokens_decoder().items()}
    assert table(ours.backend) == table(hf.backend_tokenizer)
    return hf, ours


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory, bpe_dir):
    """The BPE folder once per (template, where it is stored)."""
    dirs = {}
    for name, template in (("chatml", CHATML), ("llama3", LLAMA3), ("tools_json", TOOLS_JSON)):
        for where in ("jinja", "config"):
            folder = tmp_path_factory.mktemp(f"{name}_{where}")
            shutil.copytree(bpe_dir, folder, dirs_exist_ok=True)
            write_chat_template(folder, template, where)
            dirs[name, where] = folder
    return dirs


# ---- encode / decode ----

def test_byte_level_bpe_matches_transformers(bpe_dir):
    hf, ours = assert_same_tokens(bpe_dir)
    assert ours.encode("Hi")[0] == hf.bos_token_id  # tokenizer.json's post-processor adds BOS


def test_byte_level_tokenizer_json_named_llama_is_used_as_written(tmp_path, bpe_dir):
    """Some Llama-3-style checkpoints say tokenizer_class LlamaTokenizerFast; transformers sees the
    ByteLevel tokenizer.json and does not rebuild it as a sentencepiece pipeline."""
    shutil.copytree(bpe_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_same_tokens(tmp_path)


SENTENCEPIECE_TEXTS = TEXTS + [
    " Hello", "  two", "\nline", "a\n\nb", "x ", "  ", "\t tab", " \n ", "<s>[INST] hi [/INST]", "<s> [INST]",
    "Hello</s> after", "</s>x", "</s> x", "<s><s>a", "a<unk>b", "<unk> c", "<s>\n", "héllo 日本 🙂 \u00e9 e\u0301",
    "ﬁ ½ Ｔｅｓｔ", "a<sep>b <cls> c<sep>",
]


def sentencepiece_ids(sp, text, specials, add_bos=False, add_eos=False):
    """The reference: text split at the special tokens, each piece of text encoded by the
    sentencepiece library on its own (as Llama 2's chat format was: [bos] + sp.encode(part)),
    and as llama.cpp encodes it."""
    import re
    ids = [sp.bos_id()] if add_bos else []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += sp.encode(part)
    return ids + ([sp.eos_id()] if add_eos else [])


def assert_matches_sentencepiece(folder, add_bos=True, add_eos=False, texts=SENTENCEPIECE_TEXTS, specials=()):
    """ids equal the sentencepiece library's (text after special tokens included); decode with
    skip_special_tokens equals sp.decode; decode(encode(s)) == s wherever sentencepiece itself
    gives s back (its normalization rule may change the text)."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = Tokenizer.from_dir(folder)
    specials = ["<s>", "</s>", "<unk>", *specials]
    charsmap = sp.normalize("\r\n") != "\r\n"
    for text in texts:
        if charsmap and "\r\n" in text:
            continue  # tokenizers' Precompiled maps the grapheme "\r\n" to one space, sentencepiece to two
        ids = sentencepiece_ids(sp, text, specials, add_bos, add_eos)
        assert ours.encode(text) == ids, (text, ours.encode(text), ids)
        kept = [i for i in ids if not (sp.is_control(i) or sp.is_unknown(i))]  # sp shows <unk> as " ⁇ "
        assert ours.decode(ids, skip_special_tokens=True) == sp.decode(kept), text
        parts = [p for p in __import__("re").split("(" + "|".join(map(__import__("re").escape, specials)) + ")", text)
                 if p]
        if all(p in specials or sp.decode(sp.encode(p)) == p for p in parts):
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text, text
    return sp, ours


@needs_protobuf
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("trainer, config, add_bos, add_eos", [
    ({}, {}, True, False),  # nmt_nfkc normalization (sentencepiece's default)
    ({"normalization_rule_name": "identity"}, {}, True, False),  # Llama 2's
    ({"add_dummy_prefix": False}, {"add_bos_token": False, "add_eos_token": True}, False, True),
    ({"remove_extra_whitespaces": True}, {"add_bos_token": None}, False, False),  # absent: no BOS
])
def test_sentencepiece_folder_matches_sentencepiece(tmp_path, model_type, trainer, config, add_bos, add_eos):
    assert_matches_sentencepiece(make_sentencepiece_dir(tmp_path, model_type, trainer=trainer, **config),
                                 add_bos, add_eos)


@needs_protobuf
def test_sentencepiece_user_defined_symbols(tmp_path):
    """A user-defined piece is one id; the text after it is encoded as a piece of its own, as
    llama.cpp does (sentencepiece itself gives it no '▁': a known difference, see tokenizer.py)."""
    sp, ours = assert_matches_sentencepiece(make_sentencepiece_dir(tmp_path, user_defined_symbols=["<sep>", "<cls>"]),
                                            specials=["<sep>", "<cls>"])
    assert sp.piece_to_id("<sep>") in ours.encode("a<sep>b")


@needs_protobuf
@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=30)  # Cc: below
       | st.lists(st.sampled_from(["<s>", "</s>", " ", "  ", "\n", "a", "é", "日", "🙂", "[INST]", "x y"]),
                  max_size=10).map("".join))
def test_sentencepiece_random_text(sentencepiece_folders, text):
    """Random text on BPE models (Llama's kind). Control characters are left out: nmt_nfkc
    deletes them, and sentencepiece then still puts '▁' before the empty text, tokenizers'
    Prepend does not. (Unigram models are checked on the fixed texts only: where two
    segmentations score exactly the same, as '\n\n' '\n' and '\n' '\n\n' do, tokenizers'
    Viterbi may pick the other one.)"""
    for folder in sentencepiece_folders:
        assert_matches_sentencepiece(folder, texts=[text])


@pytest.fixture(scope="module")
def sentencepiece_folders(tmp_path_factory):
    return [make_sentencepiece_dir(tmp_path_factory.mktemp(f"sp_{model_type}_{rule}"), model_type,
                                   trainer={"normalization_rule_name": rule})
            for model_type in ("bpe",) for rule in ("identity", "nmt_nfkc")]


@needs_protobuf
@pytest.mark.parametrize("config", [{}, {"legacy": True}])
def test_llama2_tokenizer_json_matches_sentencepiece(tmp_path, config):
    """A Llama-2 folder as on the hub (tokenizer.json from transformers 4 beside tokenizer.model,
    tokenizer_class LlamaTokenizerFast): the ids are sentencepiece's, whatever `legacy` says
    (transformers 5 rebuilds the pipeline and drops the '▁' after special tokens and before
    leading spaces)."""
    assert_matches_sentencepiece(make_llama2_tokenizer_json_dir(tmp_path, **config))


@needs_protobuf
def test_llama2_tokenizer_json_of_another_model_type_is_used_as_written(tmp_path):
    """model_type mistral: transformers uses tokenizer.json as written, and so do we."""
    folder = make_llama2_tokenizer_json_dir(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_dir(folder)
    for text in TEXTS:
        assert ours.encode(text) == raw.encode(text).ids, text


def test_padding_and_truncation_in_tokenizer_json_are_not_applied(tmp_path, bpe_dir):
    shutil.copytree(bpe_dir, tmp_path, dirs_exist_ok=True)
    raw = RawTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    raw.enable_padding(length=40, pad_id=raw.token_to_id("<|pad|>"), pad_token="<|pad|>")
    raw.enable_truncation(8)
    raw.save(str(tmp_path / "tokenizer.json"))
    assert_same_tokens(tmp_path)


def test_unigram_tokenizer_json_decode_clean_up(tmp_path):
    """transformers' clean_up_tokenization_spaces (" ," -> ",", " 's" -> "'s") runs for
    non-BPE models when the config asks for it."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tok_fixtures import CORPUS
    raw = RawTokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(CORPUS * 4, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", clean_up_tokenization_spaces=True)
    hf.save_pretrained(tmp_path)
    hf, _ = assert_same_tokens(tmp_path)
    assert hf.clean_up_tokenization_spaces and type(hf.backend_tokenizer.model).__name__ == "Unigram"


def test_decode_takes_tensors_and_single_ids(bpe_dir):
    torch = pytest.importorskip("torch")
    hf, ours = hf_tokenizer(bpe_dir), Tokenizer.from_dir(bpe_dir)
    ids = hf("Café 😀 <|eot_id|>")["input_ids"]
    assert ours.decode(torch.tensor(ids)) == hf.decode(ids)
    assert ours.decode(ids[1]) == hf.decode(ids[1])


# ---- special tokens ----

def test_special_tokens_match_transformers_and_generation_config(bpe_dir):
    hf, ours = hf_tokenizer(bpe_dir), Tokenizer.from_dir(str(bpe_dir))
    assert_same_special_tokens(hf, ours)
    generation_eos = transformers.GenerationConfig.from_pretrained(bpe_dir).eos_token_id
    assert len(generation_eos) == 2 and hf.eos_token_id in generation_eos
    assert ours.eos_token_ids == [hf.eos_token_id] + [i for i in generation_eos if i != hf.eos_token_id]
    for token in ("<|eot_id|>", "<think>", "<|pad|>"):
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token)
    assert ours.token_to_id("no such token") is None


@pytest.mark.parametrize("config_lists_added_tokens", [False, True])
def test_special_tokens_map_json_and_added_tokens_decoder(tmp_path, bpe_dir, config_lists_added_tokens):
    """Older checkpoints name their special tokens in special_tokens_map.json, which transformers
    reads (over tokenizer_config.json) only when the config has no added_tokens_decoder; tokens
    the config's added_tokens_decoder lists but tokenizer.json lacks are added, then new named
    special tokens, then new extra ones."""
    shutil.copytree(bpe_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "<|eot_id|>", "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False},
        "pad_token": "<|new_pad|>", "additional_special_tokens": ["<|extra_map|>"]}))
    if config_lists_added_tokens:
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        added = RawTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_added_tokens_decoder()
        added[len(added) + 480] = transformers.AddedToken("<|extra_config|>", special=True, normalized=False)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                     "single_word": t.single_word, "special": t.special} for i, t in added.items()}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ours = assert_same_tokens(tmp_path, TEXTS + ["a<|extra_map|>b<|extra_config|>c<|new_pad|>"])
    assert_same_special_tokens(hf, ours)
    assert hf.eos_token == ("<|end_of_text|>" if config_lists_added_tokens else "<|eot_id|>")


@pytest.mark.parametrize("extra", [["<|x1|>", "<|x2|>"], {"image_token": "<|image|>"}])
def test_extra_special_tokens_in_config(tmp_path, bpe_dir, extra):
    """tokenizer_config.json's extra_special_tokens (a list, or a dict of named model-specific
    tokens) become added special tokens, as in transformers."""
    shutil.copytree(bpe_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = extra
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert_same_tokens(tmp_path, TEXTS + ["a<|x2|>b<|image|>c"])


@needs_protobuf
def test_sentencepiece_special_tokens(tmp_path):
    folder = make_sentencepiece_dir(tmp_path)
    hf, ours = hf_tokenizer(folder), Tokenizer.from_dir(folder)
    assert_same_special_tokens(hf, ours)
    assert ours.eos_token_ids == [hf.eos_token_id]  # no generation_config.json


def test_from_tokenizers_matches_transformers_given_add_bos_eos(bpe_dir):
    """The GGUF reader's path: transformers, given add_bos_token/add_eos_token for a backend,
    rewrites its post-processor; so must we."""
    for add_bos, add_eos in ((True, False), (False, True), (False, False)):
        tokens = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>")
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=RawTokenizer.from_file(str(bpe_dir / "tokenizer.json")),
            add_bos_token=add_bos, add_eos_token=add_eos, **tokens)
        ours = Tokenizer.from_tokenizers(RawTokenizer.from_file(str(bpe_dir / "tokenizer.json")),
                                         add_bos=add_bos, add_eos=add_eos, eos_token_ids=[7, 7], **tokens)
        for text in TEXTS:
            assert ours.encode(text) == hf(text)["input_ids"], (text, add_bos, add_eos)
        assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                             hf.pad_token_id)
        assert ours.eos_token_ids == [hf.eos_token_id, 7]


# ---- chat templates ----

@pytest.mark.parametrize("where", ["jinja", "config"])
@pytest.mark.parametrize("name", ["chatml", "llama3", "tools_json"])
def test_chat_template_renders_like_transformers(template_dirs, name, where):
    folder = template_dirs[name, where]
    hf, ours = hf_tokenizer(folder), Tokenizer.from_dir(folder)
    assert ours.chat_template == hf.chat_template
    extra = {"tools": TOOLS, "persona": "pirate"} if name == "tools_json" else {"date_string": "26 Jul 2024"}
    for messages in CONVERSATIONS:
        if name == "llama3" and any(m["role"] not in ("system", "user", "assistant") for m in messages):
            continue  # see test_raise_exception
        for add_generation_prompt in (False, True):
            for kwargs in ({}, extra):
                expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)
                text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
                assert text == expected
                ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=True, return_dict=False, **kwargs)
                assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, **kwargs) == ids


@needs_protobuf
def test_chat_template_on_sentencepiece_folder(tmp_path):
    """tokenize=True on a Llama-2 folder: the text renders as transformers renders it, and its
    ids are sentencepiece's for each part between special tokens (Llama 2's own format code
    encodes each turn with sp.encode and adds the BOS / EOS ids)."""
    import sentencepiece
    folder = make_sentencepiece_dir(tmp_path, chat_template=LLAMA2, trainer={"normalization_rule_name": "identity"})
    hf, ours = hf_tokenizer(folder), Tokenizer.from_dir(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    messages = CONVERSATIONS[1][1:]
    text = ours.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages, tokenize=True) == sentencepiece_ids(sp, text, ["<s>", "</s>"])


def test_raise_exception(template_dirs):
    folder = template_dirs["llama3", "jinja"]
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
        hf_tokenizer(folder).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="chat template failed to render .*Unknown role: tool"):
        Tokenizer.from_dir(folder).apply_chat_template(messages)


def test_strftime_now(template_dirs):
    import datetime
    text = Tokenizer.from_dir(template_dirs["llama3", "jinja"]).apply_chat_template(CONVERSATIONS[1])
    assert f"Date: {datetime.datetime.now().year}\n" in text  # the template's own default


def test_chat_template_jinja_file_wins_over_config(template_dirs, tmp_path):
    shutil.copytree(template_dirs["chatml", "config"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(LLAMA3, encoding="utf-8")
    hf, ours = hf_tokenizer(tmp_path), Tokenizer.from_dir(tmp_path)
    assert ours.chat_template == hf.chat_template == LLAMA3


def test_missing_chat_template_is_a_clear_error(bpe_dir):
    expected = r"no chat template.*chat_template\.jinja.*tokenizer_config\.json"
    with pytest.raises(ValueError, match=expected) as error:
        Tokenizer.from_dir(bpe_dir).apply_chat_template(CONVERSATIONS[0])
    assert str(bpe_dir) in str(error.value)


# ---- bad input ----

def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer.from_dir(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Tokenizer.from_dir(tmp_path / "missing")


@pytest.mark.parametrize("config, model_type", [({"tokenizer_class": "T5Tokenizer"}, None),
                                                ({"tokenizer_class": None}, None), ({}, "mistral")])
def test_sentencepiece_of_another_family_is_refused(tmp_path, config, model_type):
    """transformers converts these another way (with no tokenizer_class, or for a mistral model,
    through its generic class); a clear error beats ids that differ."""
    make_sentencepiece_dir(tmp_path, **config)
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    expected = r"tokenizer\.model with tokenizer_class .* not supported.*tokenizer\.json"
    with pytest.raises(ValueError, match=expected):
        Tokenizer.from_dir(tmp_path)
