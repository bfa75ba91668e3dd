"""Tokenizers of HF checkpoints behind one interface, and their chat templates.

Everything runs on a `tokenizers.Tokenizer`. A folder's tokenizer.json is used as written;
a sentencepiece tokenizer.model (a Llama-2-style folder without tokenizer.json) is converted
into one the way transformers 5's LlamaTokenizer converts it, so the ids equal
`AutoTokenizer.from_pretrained(folder)`'s in both cases. Chat templates are rendered with
the Jinja settings transformers uses, so a prompt reads the same token for token.
"""
import json
import struct
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

# The named special tokens transformers knows (and passes to chat templates when set).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


class Tokenizer:
    """One interface over a `tokenizers.Tokenizer`; build it with `from_dir` or `from_tokenizers`.

    `special_tokens` maps names (bos_token, eos_token...) to token text; `extra_special_tokens`
    are further special tokens. `add_bos_eos` = (add_bos, add_eos) replaces the backend's
    post-processor, as transformers does when it is told those flags; None keeps the backend's
    own. `source` names where the tokenizer came from, for error messages.
    """

    def __init__(self, backend: Backend, special_tokens: dict, extra_special_tokens=(), chat_template=None,
                 extra_eos_ids=(), add_bos_eos=None, clean_up_spaces=False, source="tokenizer"):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.special_tokens = {name: t for name, t in special_tokens.items() if t is not None}
        # Encode exactly what was asked: a tokenizer.json may carry padding or truncation settings
        backend.no_padding()
        backend.no_truncation()
        # transformers makes every special token an added special token (named ones first), so it
        # is matched whole in text and skipped by decode(skip_special_tokens=True)
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        wanted = [*self.special_tokens.values(), *extra_special_tokens]
        missing = dict.fromkeys(t for t in wanted if t not in added)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            self.special_tokens.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token"))
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            None if t is None else backend.token_to_id(t)
            for t in (self.bos_token, self.eos_token, self.pad_token))
        ids = [self.eos_token_id, *extra_eos_ids]
        self.eos_token_ids = [i for n, i in enumerate(ids) if i is not None and i not in ids[:n]]
        if add_bos_eos is not None:
            _set_bos_eos_post_processor(backend, self.bos_token, self.eos_token, *add_bos_eos)
        # transformers skips its decode clean-up for BPE models (it would eat spaces before punctuation)
        self.clean_up_spaces = clean_up_spaces and not isinstance(backend.model, models.BPE)
        # sentencepiece pipelines put a '▁' before each piece of text between added tokens
        # (llama_pipeline); decode takes it off each piece again, so decode(encode(s)) == s
        prefixes_pieces = backend.normalizer is not None and b'"Prepend"' in backend.normalizer.__getstate__()
        self._piece_breaks = {i: t.content for i, t in backend.get_added_tokens_decoder().items()
                              if not t.normalized} if prefixes_pieces else {}

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load the tokenizer of an HF checkpoint folder (tokenizer.json, else tokenizer.model)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (expected an HF checkpoint folder)")
        try:
            return cls._from_dir(folder)
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            # a value of the wrong type somewhere in the tokenizer files (a token that is a
            # number, a list where an object belongs): one line naming the folder, not a traceback
            raise ValueError(f"{folder}: the tokenizer files hold a value of an unexpected type "
                             f"({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dir(cls, folder: Path) -> "Tokenizer":
        config = _read_json(folder / "tokenizer_config.json")
        # Older checkpoints keep their special tokens in special_tokens_map.json; transformers reads
        # it (over tokenizer_config.json) only when the config has no added_tokens_decoder.
        if "added_tokens_decoder" not in config:
            config.update(_read_json(folder / "special_tokens_map.json"))
        special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        extra_tokens = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra_tokens = [_token_text(t) for t in (extra_tokens.values() if isinstance(extra_tokens, dict)
                                                 else extra_tokens)]
        # transformers 5 picks its LlamaTokenizer (which rebuilds the pipeline, see llama_pipeline)
        # when tokenizer_config.json names it, unless config.json's model_type maps to another
        # class: mistral and mixtral, say, get its generic class, which uses tokenizer.json as written.
        tokenizer_class = config.get("tokenizer_class")
        model_type = _read_json(folder / "config.json").get("model_type")
        is_llama = tokenizer_class in LLAMA_CLASSES and model_type in (None, "llama")
        add_prefix_space = config.get("add_prefix_space")
        add_bos_eos = None

        if (folder / "tokenizer.json").exists():
            # add_bos_token/add_eos_token are ignored here: transformers keeps the file's post-processor
            try:
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises plain Exception for any parse error
                raise ValueError(f"{folder / 'tokenizer.json'}: not a readable tokenizer.json "
                                 f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
            if is_llama and '"ByteLevel"' not in backend.to_str():  # Llama 3 ships ByteLevel as Llama*
                llama_pipeline(backend, add_prefix_space)
        elif (folder / "tokenizer.model").exists():
            if not is_llama:
                raise ValueError(
                    f"{folder}: a tokenizer.model with tokenizer_class {tokenizer_class!r} and model_type "
                    f"{model_type!r} is not supported; nanolora reads sentencepiece models as transformers' "
                    "LlamaTokenizer does (tokenizer_class LlamaTokenizer, model_type llama). Save the "
                    "tokenizer as tokenizer.json to use it: "
                    "AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
            # LlamaTokenizer's defaults, for configs that do not name these tokens at all
            for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
                special_tokens[name] = _token_text(config.get(name, default))
            try:
                backend, normalizer_spec = _sentencepiece_to_bpe(folder / "tokenizer.model")
            except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
                raise ValueError(f"{folder / 'tokenizer.model'}: not a readable sentencepiece model ({e})") from None
            if add_prefix_space is None:
                add_prefix_space = normalizer_spec["add_dummy_prefix"]
            llama_pipeline(backend, add_prefix_space, **{k: v for k, v in normalizer_spec.items()
                                                         if k != "add_dummy_prefix"})
            add_bos_eos = config.get("add_bos_token", False), config.get("add_eos_token", False)
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model in this folder")

        # Added tokens the config lists but the backend lacks; transformers adds them (in id order)
        # before the special tokens
        listed = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0]))
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_tokens([AddedToken(**{k: v for k, v in t.items() if k != "__type"})
                            for _, t in listed if t["content"] not in present])

        # transformers 5 writes the template to chat_template.jinja, which wins over the config's
        template_file = folder / "chat_template.jinja"
        chat_template = (template_file.read_text(encoding="utf-8") if template_file.exists()
                         else config.get("chat_template"))
        if isinstance(chat_template, list):  # older format for several templates: [{"name", "template"}]
            chat_template = {t["name"]: t["template"] for t in chat_template}
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string, "
                             f"got {type(chat_template).__name__}")
        generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra_eos_ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        return cls(backend, special_tokens, extra_tokens, chat_template, extra_eos_ids, add_bos_eos,
                   clean_up_spaces=config.get("clean_up_tokenization_spaces", False), source=str(folder))

    @classmethod
    def from_tokenizers(cls, tok: Backend, *, bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                        add_bos=False, add_eos=False, chat_template=None, eos_token_ids=None,
                        source="tokenizers.Tokenizer") -> "Tokenizer":
        """Wrap a `tokenizers.Tokenizer` built elsewhere (the GGUF reader), which it then owns.
        As transformers does when given add_bos/add_eos, those decide what encode() adds."""
        special_tokens = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                              unk_token=unk_token)
        return cls(tok, special_tokens, chat_template=chat_template, extra_eos_ids=eos_token_ids or (),
                   add_bos_eos=(add_bos, add_eos), source=source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors and arrays
        ids = [ids] if isinstance(ids, int) else list(ids)
        if self._piece_breaks and not skip_special_tokens and any(i in self._piece_breaks for i in ids):
            text, run = "", []
            for i in ids + [None]:
                if i is None or i in self._piece_breaks:
                    text += self.backend.decode(run, skip_special_tokens=False) if run else ""
                    text += self._piece_breaks.get(i, "")
                    run = []
                else:
                    run.append(i)
        else:
            text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:  # transformers' clean-up: undo the spaces WordPiece-era tokenizers put back
            for spaced in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
                text = text.replace(spaced, spaced.strip())
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Render `messages` with the checkpoint's template; token ids when `tokenize` (no BOS/EOS
        added: the template writes its own). Extra kwargs (tools, documents, enable_thinking...)
        reach the template, as do the special tokens (bos_token, eos_token...)."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: this tokenizer has no chat template (a checkpoint keeps it in "
                             "chat_template.jinja or in tokenizer_config.json's \"chat_template\")")
        if not messages:
            raise ValueError("apply_chat_template: the conversation is empty")
        # As transformers: drop None values (templates test for a missing key, and would print "None"),
        # and give a message's reasoning under every name templates read it by.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for i, message in enumerate(messages):
            names = ("reasoning_content", "thinking", "reasoning")
            reasoning = next((message[name] for name in names if name in message), None)
            if reasoning is not None:
                messages[i] = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            text = _render(_compile_template(self.chat_template), messages=messages,
                           add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{self.source}: the chat template does not parse (line {e.lineno}: {e.message})") from None
        except (jinja2.TemplateError, RecursionError, ArithmeticError, MemoryError, TypeError) as e:
            raise ValueError(f"{self.source}: the chat template failed to render "
                             f"({type(e).__name__}: {str(e)[:300]})") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _read_json(file: Path) -> dict:
    """A tokenizer folder's JSON file as a dict ({} when absent); an error names the file."""
    if not file.exists():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8
        raise ValueError(f"{file}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value):
    """Config files write a token as a string or as an AddedToken dict {"content": ...}."""
    return value["content"] if isinstance(value, dict) else value


def _set_bos_eos_post_processor(backend: Backend, bos, eos, add_bos: bool, add_eos: bool):
    """What transformers' update_post_processor does: BOS before and/or EOS after each sequence."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def llama_pipeline(backend: Backend, add_prefix_space=None, precompiled_charsmap=b"",
                   remove_extra_whitespaces=False, split_words=None):
    """A sentencepiece model's text pipeline, as the sentencepiece library runs it: its
    normalization rule (`precompiled_charsmap`: NFKC and the like; empty for Llama's identity),
    whitespace runs collapsed if the model says so, one '▁' before the text (add_dummy_prefix)
    and every space as '▁'. Decoding undoes the '▁'s, joins byte pieces and drops the one
    leading space the prefix added.

    As a normalizer, the prefix goes before each piece of text between special tokens: that
    is what the model was trained on (`[bos] + sp.encode(text)`, each template part encoded on
    its own) and what llama.cpp does. A '▁' is added even before text that starts with a
    space, so " Hello" is '▁' '▁Hello', as in sentencepiece. (transformers 5's LlamaTokenizer
    uses a Metaspace pre-tokenizer instead, which skips the prefix there and, with legacy=False,
    after special tokens: those ids are not sentencepiece's.)

    split_words: how sentencepiece's BPE cuts the text into words before merging (merges never
    cross a word): None, no cut (llama.cpp, and unigram models); "space" before each '▁' (the
    default); "space_runs" before the first '▁' of a run, the run staying with the word after it
    (allow_whitespace_only_pieces, as Llama's model has). As sentencepiece's SplitIntoWords."""
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    steps = [normalizers.Precompiled(precompiled_charsmap)] if precompiled_charsmap else []
    if remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    steps += ([normalizers.Prepend("▁")] if add_prefix_space else []) + [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(steps)
    words = {None: None, "space": "▁[^▁]*|[^▁]+", "space_runs": "▁+[^▁]*|[^▁]+"}[split_words]
    backend.pre_tokenizer = None if words is None else pre_tokenizers.Split(Regex(words), behavior="isolated")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))


def _sentencepiece_to_bpe(model_file: Path) -> tuple[Backend, dict]:
    """A sentencepiece model as a `tokenizers` model that gives its ids, and the settings of its
    text pipeline (for llama_pipeline). A unigram model becomes tokenizers' Unigram (the same
    best-score segmentation, with byte fallback); a BPE model the byte-fallback BPE transformers
    builds from it: the pieces in id order are the vocabulary, and every split of a piece into
    two pieces is a merge, ranked by the id of the merged piece (sentencepiece gives better
    pieces lower ids). Control pieces (<s>, </s>) become added special tokens, user-defined
    ones added tokens, so text spelling them maps to their id."""
    pieces, spec = _read_sentencepiece_model(model_file.read_bytes())
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # sentencepiece's ModelProto.SentencePiece.Type
    if spec.pop("unigram"):
        unk_id = next((i for i, (_, kind, _) in enumerate(pieces) if kind == UNKNOWN), None)
        backend = Backend(models.Unigram([(piece, score) for piece, _, score in pieces], unk_id, byte_fallback=True))
    else:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        merges = [(piece[:cut], piece[cut:]) for piece, _, _ in pieces for cut in range(1, len(piece))
                  if piece[:cut] in vocab and piece[cut:] in vocab]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # Known difference: the text after a user-defined piece gets its own '▁' (as in llama.cpp);
    # sentencepiece matches such pieces inside the text, without one. An added token matched
    # after normalization would be normalized itself, '▁' prefix included, and never match.
    backend.add_tokens([AddedToken(piece, special=kind == CONTROL, normalized=False)
                        for piece, kind, _ in pieces if kind in (CONTROL, USER_DEFINED)])
    return backend, spec


def _read_sentencepiece_model(proto: bytes) -> tuple[list[tuple[str, int]], dict]:
    """(piece, type, score) of each piece in a sentencepiece model file, and the settings of its
    text pipeline, read straight off the protobuf wire format (no protobuf dependency).
    ModelProto field 1 is the repeated SentencePiece message (field 1 the piece text, 2 its
    score, 3 its type, NORMAL=1 when absent); field 2 the TrainerSpec (3 model_type, UNIGRAM=1
    when absent; 22 split_by_whitespace, true; 26 allow_whitespace_only_pieces, false); field 3
    the NormalizerSpec (2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces;
    both true when absent)."""
    def fields(buf):  # (field number, value) pairs of one message; varints as ints, the rest as bytes
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            wire_type = key & 7
            if wire_type == 0:
                value, pos = varint(buf, pos)
            elif wire_type == 2:
                size, pos = varint(buf, pos)
                value, pos = buf[pos:pos + size], pos + size
            elif wire_type in (1, 5):  # fixed 64 / 32 bit (the piece scores)
                width = 8 if wire_type == 1 else 4
                value, pos = buf[pos:pos + width], pos + width
            else:
                raise ValueError(f"not a sentencepiece model: protobuf wire type {wire_type}")
            yield key >> 3, value

    def varint(buf, pos):
        result = shift = 0
        while True:
            byte = buf[pos]
            result |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return result, pos

    pieces, trainer, normalizer = [], {}, {}
    for number, message in fields(proto):
        if number == 1:
            piece = dict(fields(message))
            score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
            pieces.append((piece[1].decode("utf-8"), piece.get(3, 1), score))
        elif number == 2:
            trainer = dict(fields(message))
        elif number == 3:
            normalizer = dict(fields(message))
    unigram = trainer.get(3, 1) == 1
    split_words = None if unigram or not trainer.get(22, 1) else "space_runs" if trainer.get(26, 0) else "space"
    spec = {"unigram": unigram, "split_words": split_words,
            "precompiled_charsmap": bytes(normalizer.get(2, b"")), "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1))}
    return pieces, spec


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its masks;
    templates that use it must still render, so the block renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _CappedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox keeps a template from reaching Python; these caps keep it from taking all
    memory or time: a string or list a template builds holds at most MAX_ITEMS items, an
    integer power at most MAX_POWER_BITS bits, range() at most MAX_ITEMS steps, and a render
    stops after MAX_SECONDS (checked at every range step, call, operator and output chunk)."""
    MAX_ITEMS, MAX_POWER_BITS, MAX_SECONDS = 10_000_000, 4096, 10.0
    intercepted_binops = frozenset({"*", "**", "+"})
    deadline = None

    def check_time(self):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise jinja2.exceptions.SecurityError(f"rendering took over {self.MAX_SECONDS:g} s")

    def call_binop(self, context, operator, left, right):
        self.check_time()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and max(abs(left), 2).bit_length() * right > self.MAX_POWER_BITS:
            raise jinja2.exceptions.SecurityError(f"{left} ** {right} is too large")
        if operator == "*" and isinstance(right, (str, list, tuple)):
            left, right = right, left  # n * sequence
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                and len(left) * right > self.MAX_ITEMS:
            raise jinja2.exceptions.SecurityError(f"a sequence of {len(left) * right} items is too large")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > self.MAX_ITEMS:
            raise jinja2.exceptions.SecurityError(f"a sequence of {len(left) + len(right)} items is too large")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs):
        self.check_time()
        return super().call(context, obj, *args, **kwargs)

    def capped_range(self, *args):
        steps = range(*args)
        if len(steps) > self.MAX_ITEMS:
            raise jinja2.exceptions.SecurityError(f"range of {len(steps)} steps is too large")
        return _TimedRange(self, steps)


class _TimedRange:
    """A range whose iteration checks the render's deadline (a loop with an empty body calls nothing)."""

    def __init__(self, env, steps):
        self.env, self.steps = env, steps

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        for n, value in enumerate(self.steps):
            if n % 1024 == 0:
                self.env.check_time()
            yield value


def _render(template, **variables) -> str:
    """template.render, under the caps of _CappedSandbox (output included)."""
    env = template.environment
    env.deadline = time.monotonic() + env.MAX_SECONDS
    try:
        chunks, size = [], 0
        for chunk in template.generate(**variables):
            chunks.append(chunk)
            size += len(chunk)
            if size > env.MAX_ITEMS:
                raise jinja2.exceptions.SecurityError(f"the rendering passed {env.MAX_ITEMS} characters")
            env.check_time()
        return "".join(chunks)
    finally:
        env.deadline = None


@lru_cache
def _compile_template(template: str) -> jinja2.Template:
    """Templates are untrusted code from the hub: a sandbox that cannot mutate its inputs. The
    settings and helpers are transformers': trim_blocks/lstrip_blocks, {% break %}/{% continue %},
    raise_exception(), strftime_now(), and a tojson that keeps non-ASCII and does not
    HTML-escape (Jinja's own writes '<' as \\u003c)."""
    env = _CappedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.globals["range"] = env.capped_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)
