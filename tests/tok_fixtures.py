"""Tokenizer folders made by the tests, shaped like real HF checkpoints.

`make_bpe_tokenizer_dir` writes a Llama-3-style byte-level BPE tokenizer.json (saved by
transformers, so the folder has the files a hub checkpoint has); `make_sentencepiece_dir`
writes a Llama-2-style folder holding only tokenizer.model and tokenizer_config.json;
`make_llama2_tokenizer_json_dir` adds the tokenizer.json a Llama-2 hub folder carries.
All are trained here on a small corpus, so nothing is fetched and each takes well under
a second. (transformers reads tokenizer.model only with protobuf installed.)
"""
import functools
import io
import json
import os

# Varied on purpose: ASCII prose, code, digits, accents, CJK, emoji, whitespace runs.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12345 steps and 3.14 miles away!",
    "Hello world, hello there. How are you doing today? I'm fine, thanks; we'll see.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))  # 42\n",
    "Café, naïve, résumé, über, façade, jalapeño, Ångström, crème brûlée.",
    "日本語のテキストです。中文文本测试。한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 ❤️ and symbols © ® ™ € £ ¥ → ∞.",
    "  leading spaces,\ttabs\tand\nnew lines\n\nand   runs   of   spaces.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024-06-01 07:30 +1.5e-3 -42",
    "User: what is LoRA? Assistant: a low-rank adapter trained on top of frozen weights.",
]

# Llama-3's pre-tokenizer split: contractions, letter runs, digits in groups of three,
# punctuation runs, newlines, and whitespace (the last space stays with the next word).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
BPE_PLAIN_ADDED_TOKEN = "<think>"  # added but not special: kept by decode(skip_special_tokens=True)


def write_chat_template(path, template, where):
    """Store `template` where transformers 5 writes it ("jinja": chat_template.jinja) or
    where older checkpoints keep it ("config": tokenizer_config.json's "chat_template")."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("chat_template", None)
    if os.path.exists(jinja_file):
        os.remove(jinja_file)
    if where == "jinja":
        with open(jinja_file, "w", encoding="utf-8") as f:
            f.write(template)
    elif where == "config":
        config["chat_template"] = template
    else:
        raise ValueError(f"where must be 'jinja' or 'config', got {where!r}")
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def write_generation_eos(path, eos_token_ids, bos_token_id=None):
    """Set generation_config.json's eos_token_id (and bos), keeping whatever else it holds."""
    file = os.path.join(path, "generation_config.json")
    config = {}
    if os.path.exists(file):
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    config["eos_token_id"] = eos_token_ids
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    with open(file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


@functools.lru_cache
def _llama3_style_bpe_json(vocab_size):
    """The trained tokenizer as tokenizer.json text; trained once per process and size, since
    many tests save it next to their checkpoints."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BPE_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(BPE_PLAIN_ADDED_TOKEN, special=False, normalized=False)])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


def make_bpe_tokenizer_dir(path, vocab_size=480, chat_template=None, template_in="jinja"):
    """Train a Llama-3-style byte-level BPE and save it to `path` as transformers would.

    Special tokens come after the learned vocabulary (as in Llama 3), BOS is added by the
    tokenizer.json post-processor, and generation_config.json lists two end-of-turn ids (an
    existing generation_config.json keeps its other fields). vocab_size + the 9 added tokens
    stays under tests/hf_fixtures.py's VOCAB (512). Returns the path.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_llama3_style_bpe_json(vocab_size))
    bos = "<|begin_of_text|>"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>",
                                     pad_token="<|pad|>", chat_template=chat_template)
    hf_tok.save_pretrained(path)
    if chat_template is not None:
        write_chat_template(path, chat_template, template_in)
    write_generation_eos(path, [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")],
                         bos_token_id=tok.token_to_id(bos))
    return path


def make_sentencepiece_dir(path, model_type="bpe", vocab_size=400, user_defined_symbols=(), trainer=None, **config):
    """Train a sentencepiece model (byte fallback on) and write a Llama-2-style folder:
    tokenizer.model + tokenizer_config.json only. `user_defined_symbols` are pieces sentencepiece
    always keeps whole (like "<sep>"); `trainer` adds or overrides trainer options
    (normalization_rule_name, add_dummy_prefix ...); `config` adds or overrides
    tokenizer_config.json keys (add_bos_token, add_eos_token, legacy, chat_template ...); a key
    given as None is left out.
    Returns the path."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.99, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, user_defined_symbols=list(user_defined_symbols),
        # Llama 2 keeps whitespace as written; the pieces must then cover space runs
        **{"remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True, **(trainer or {})})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                        **config}
    tokenizer_config = {key: value for key, value in tokenizer_config.items() if value is not None}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    return path


def make_llama2_tokenizer_json_dir(path, **config):
    """A Llama-2-style folder as it sits on the hub: tokenizer.json written by transformers 4's
    LlamaConverter (a normalizer that prepends '▁' and turns spaces into '▁', no pre-tokenizer,
    BOS added by the post-processor) next to the sentencepiece model, tokenizer_class
    LlamaTokenizerFast. transformers 5 rebuilds that pipeline instead of using it, which changes
    the ids of text right after a special token. `config` overrides tokenizer_config.json keys."""
    from tokenizers import normalizers, processors
    from transformers import AutoTokenizer

    make_sentencepiece_dir(path, trainer=dict(normalization_rule_name="identity"))  # Llama 2's rule
    tok = AutoTokenizer.from_pretrained(path).backend_tokenizer  # the BPE vocab and merges
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(os.path.join(path, "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                        "legacy": False, **config}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    return path
