"""Before/after samples: what the model answers to a few held-out prompts, shown beside the
question a person wrote."""
import torch

from nanolora.data import IGNORE


def prompt_ids(example) -> list[int]:
    """An example's tokens before its first label: what generation continues from."""
    return example.input_ids[:next(i for i, label in enumerate(example.labels) if label != IGNORE)]


@torch.no_grad()
def generate_samples(model, tokenizer, examples, device, autocast, pad_id, max_new_tokens=48) -> list[str]:
    """Greedy completions of each example's prompt, all prompts in one left-padded batch: a
    decoding step reads every weight once however many rows it holds, so a few rows cost
    little more than one."""
    if not examples:
        return []
    was_training = model.training
    model.eval()
    prompts = [prompt_ids(ex) for ex in examples]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with autocast:
        out = model.generate(ids, max_new_tokens, attention_mask=mask, eos_token_id=tokenizer.eos_token_ids)
    model.train(was_training)
    return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True).strip() for row in out]


def format_samples(examples, before, after, width=100) -> str:
    """One block per example: the question (whitespace collapsed, cut to `width` characters),
    then the answers before and after training."""
    blocks = []
    for ex, answer_before, answer_after in zip(examples, before, after):
        question = " ".join(ex.prompt.split())
        question = question if len(question) <= width else question[:width - 3] + "..."
        blocks.append(f"--- {question}\nbefore: {answer_before}\nafter:  {answer_after}")
    return "\n\n".join(blocks)
