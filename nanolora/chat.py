"""Chat with a model, to try what a run trained.

    python -m nanolora.chat MODEL [--adapter out/] [--load_in_4bit true|dynamic] [--temperature 0.7]
    echo "Define LAWYER." | python -m nanolora.chat MODEL --adapter out/

MODEL is an HF folder (a base, or a full fine-tune's output), a hub id or a .gguf file. The
conversation is rendered with the model's chat template and the reply streamed token by
token; each turn sees the ones before it. /reset starts a new conversation, /quit (or end of
input) leaves. With input piped in, each line is one user turn, answered in order.
"""
import argparse
import sys

import torch

from nanolora import cli
from nanolora.default_model import resolve_model
from nanolora.load import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanolora.chat", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="HF folder, hub id or .gguf file")
    parser.add_argument("--adapter", help="a PEFT LoRA adapter folder (what train.py writes)")
    parser.add_argument("--load_in_4bit", default=False, type=lambda text: cli.boolean(text, "dynamic"),
                        metavar="{true,false,dynamic}", help="NF4 base (QLoRA); dynamic: as the adapter's dynamic_4bit.json chose")
    parser.add_argument("--system", help="a system prompt, as the conversation's first turn")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="sample from this much probability mass")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("expected --temperature >= 0, 0 < --top_p <= 1 and --max_new_tokens >= 1")
    return args


class TextStream:
    """Writes the text of tokens as they come. Decoding the reply so far and writing what is
    new keeps multi-token characters and word-initial spaces right; text ending in U+FFFD (an
    incomplete UTF-8 sequence) waits for the next token."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.written = tokenizer, out, [], ""

    def __call__(self, next_ids):
        token = int(next_ids[0])
        if token in self.tokenizer.eos_token_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.written):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text

    def text(self):
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def chat(model, tokenizer, lines, out, args, device, interactive=False):
    """Answer each line of `lines` (an iterable of str) on `out`; returns the conversation."""
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        stream = TextStream(tokenizer, out)
        model.generate(torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_token_id=tokenizer.eos_token_ids, generator=generator, on_token=stream)
        reply = stream.text()
        out.write(reply[len(stream.written):] + "\n")  # anything held back, then the turn's end
        if interactive:
            out.write("> ")
        out.flush()
        messages.append({"role": "assistant", "content": reply})
    return messages


def main(argv=None, stdin=None, out=None):
    args = parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model(resolve_model(args.model), device=device, adapter=args.adapter,
                                  load_in_4bit=args.load_in_4bit)
    if tokenizer.chat_template is None:
        sys.exit(f"{args.model}: the tokenizer has no chat template, so there is no conversation format to chat in")
    model.eval()
    interactive = stdin.isatty()
    if interactive:
        out.write("/reset starts over, /quit leaves\n> ")
        out.flush()
    return chat(model, tokenizer, stdin, out, args, device, interactive)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"chat: {e}")
    except KeyboardInterrupt:
        pass
