"""A tokenizer as GGUF `tokenizer.*` metadata, the way llama.cpp reads it.

Three sources, tried in the order llama.cpp's converter tries them:

- a GGUF base model: its `tokenizer.*` keys are copied as they are;
- a sentencepiece `tokenizer.model` in the base folder: tokenizer model `llama`, the pieces
  with their scores and types (read with sentencepiece, as convert_hf_to_gguf.py does);
- a byte-level BPE tokenizer.json: tokenizer model `gpt2`, the vocabulary in id order,
  token types, merges, and `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp
  should split text with.

llama.cpp's converter names the pre-tokenizer by hashing the ids a test string encodes to,
which fails for any vocabulary it has not seen. Here the name comes from the pre-tokenizer
itself, as tokenizer.json describes it, so any vocabulary built on a known pre-tokenizer
converts (PRE_TOKENIZERS). Special token ids, whether BOS/EOS are added (asked of the
tokenizer itself: does encode() add them?) and the chat template come from the loaded
nanolora Tokenizer. The token list gets exactly one entry per embedding row: rows past the
tokenizer are `[PAD{i}]` tokens of type UNUSED, as the converter writes them.
"""
import json
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type

# tokenizer.json pre-tokenizers -> the llama.cpp name that splits text the same way
# (src/llama-vocab.cpp: llm_tokenizer_bpe). Each is the list of steps of a "Sequence"
# pre-tokenizer: ("Split", regex), ("Digits", individual_digits), ("ByteLevel", use_regex).
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one at a time
PRE_TOKENIZERS = {
    "llama-bpe": [("Split", _LLAMA3_REGEX), ("ByteLevel", False)],  # Llama 3
    "qwen2": [("Split", _QWEN2_REGEX), ("ByteLevel", False)],  # Qwen2, Qwen2.5, Qwen3
    "smollm": [("Digits", True), ("ByteLevel", True)],  # SmolLM, SmolLM2 (StarCoder's)
    "gpt-2": [("ByteLevel", True)],  # GPT-2's regex inside ByteLevel
}


def tokenizer_metadata(tokenizer, n_vocab: int, source, config=None) -> dict:
    """The `tokenizer.*` GGUF keys for `tokenizer` (a nanolora Tokenizer) of a model whose
    embedding has n_vocab rows. source: the base model's folder or .gguf file; config: its
    ModelConfig (fallback special token ids)."""
    source = Path(source)
    if source.suffix == ".gguf":
        from nanolora.gguf import GGUFFile
        meta = {k: v for k, v in GGUFFile(source).metadata.items() if k.startswith("tokenizer.")}
        if len(meta.get("tokenizer.ggml.tokens", [])) != n_vocab:
            raise ValueError(f"{source}: the tokenizer lists {len(meta.get('tokenizer.ggml.tokens', []))} "
                             f"tokens, but the embedding has {n_vocab} rows")
        return meta
    if (source / "tokenizer.model").exists():
        meta = _sentencepiece(source / "tokenizer.model", tokenizer, n_vocab)
    else:
        meta = _byte_level_bpe(tokenizer, n_vocab)
    # ids the tokenizer names, else those config.json gives
    fallback = {"bos": getattr(config, "bos_token_id", None), "pad": getattr(config, "pad_token_id", None),
                "eos": _first(getattr(config, "eos_token_id", None))}
    unk_id = None if tokenizer.unk_token is None else tokenizer.token_to_id(tokenizer.unk_token)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", unk_id), ("padding", tokenizer.pad_token_id)):
        token_id = fallback.get(key) if token_id is None else token_id
        if token_id is not None and 0 <= token_id < n_vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
    # what encode() adds is what llama.cpp should add: ask the tokenizer
    with_special, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    added = len(with_special) > len(plain)
    meta["tokenizer.ggml.add_bos_token"] = added and with_special[0] == tokenizer.bos_token_id
    meta["tokenizer.ggml.add_eos_token"] = added and with_special[-1] == tokenizer.eos_token_id
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _first(ids):
    return ids[0] if isinstance(ids, list) and ids else ids if isinstance(ids, int) else None


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens like <|eot_id|> are
    control tokens even where tokenizer.json forgot to mark them special."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>")) \
        or token in ("<pad>", "<mask>") or (token.startswith("<unused") and token.endswith(">"))


def _byte_level_bpe(tokenizer, n_vocab):
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(pre):
        raise ValueError(f"{tokenizer.source}: a {model.get('type')} tokenizer.json without a ByteLevel "
                         f"pre-tokenizer cannot be written to GGUF (supported: byte-level BPE tokenizer.json, "
                         f"or a sentencepiece tokenizer.model)")
    pre_name = pre_tokenizer_name(pre, tokenizer.source)
    vocab = backend.get_vocab(with_added_tokens=True)  # {token: id}
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"{tokenizer.source}: the tokenizer has token id {max(vocab.values())}, but the "
                         f"model's embedding has only {n_vocab} rows")
    added = backend.get_added_tokens_decoder()  # {id: AddedToken}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for token, i in vocab.items():
        if i in added:
            special = added[i].special or _looks_special(token)
            tokens[i] = token if special else token.replace("▁", " ")  # as the converter writes them
            types[i] = CONTROL if special else USER_DEFINED
        else:
            tokens[i], types[i] = token, NORMAL
    # merges as "left right"; a space inside a part is written as U+0120 (as SpecialVocab does)
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
              for m in model.get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_name, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def pre_tokenizer_name(pre: dict, source="tokenizer.json") -> str:
    """A tokenizer.json `pre_tokenizer` -> the llama.cpp pre-tokenizer that splits the same way.

    Split steps must isolate their matches (behavior Isolated, not inverted); ByteLevel must
    not add a prefix space (llama.cpp never does for BPE). Anything else is an error naming
    the structure, rather than a file that tokenizes differently in llama.cpp.
    """
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    structure = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            structure.append(("Split", step["pattern"]["Regex"]))
        elif kind == "Digits":
            structure.append(("Digits", bool(step.get("individual_digits"))))
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            structure.append(("ByteLevel", step.get("use_regex", True)))
        else:
            structure.append((kind, {k: v for k, v in step.items() if k != "type"}))
    for name, known in PRE_TOKENIZERS.items():
        if structure == known:
            return name
    # A folder nanolora made from a GGUF (the default model's fallback, a merged export of a
    # .gguf base) holds the pre-tokenizer gguf.py builds from tokenizer.ggml.pre: name it back.
    from nanolora.gguf import PRE_TOKENIZERS as READ_FROM_GGUF
    for name in PRE_TOKENIZERS:
        if structure == [("Split", regex) for regex in READ_FROM_GGUF[name]] + [("ByteLevel", False)]:
            return name
    raise ValueError(f"{source}: its pre-tokenizer {structure} is not one nanolora can name for llama.cpp "
                     f"(known: {', '.join(f'{n} = {s}' for n, s in PRE_TOKENIZERS.items())})")


def _sentencepiece(model_file, tokenizer, n_vocab):
    """convert_hf_to_gguf.py's _create_vocab_sentencepiece: pieces, scores and types by id;
    tokens the tokenizer adds on top of the sentencepiece model (ids past it, or a different
    text at an id) are written with score -1000, as control or user-defined tokens."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor(model_file=str(model_file))
    if sp.vocab_size() > n_vocab:
        raise ValueError(f"{model_file}: {sp.vocab_size()} pieces, but the model's embedding has only "
                         f"{n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [UNUSED] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                    else BYTE if sp.is_byte(i) else NORMAL)
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        if i >= n_vocab:
            raise ValueError(f"{tokenizer.source}: added token {added.content!r} has id {i}, past the "
                             f"model's {n_vocab} embedding rows")
        if i >= sp.vocab_size() or tokens[i] != added.content:
            special = added.special or _looks_special(added.content)
            tokens[i] = added.content if special else added.content.replace("▁", " ")
            scores[i], types[i] = -1000.0, CONTROL if special else USER_DEFINED
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": pre.get("prepend_scheme", "first") != "never"}
