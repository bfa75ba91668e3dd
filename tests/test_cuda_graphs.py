"""CUDA graphs for the micro-step (nanolora/cuda_graphs.py): the graphed steps train exactly as
the eager ones. On the CPU: right-padding to a bucket leaves the loss and LoRA gradients as
they were (the fact the graphs rest on), and the reasons graphs stay off. On the GPU: several
optimizer steps with gradient accumulation, two lengths and a padded batch, graphed against
eager from the same start."""
import pytest
import torch

from hf_fixtures import checkpoint_fixture, randomize_lora, save_checkpoint
from hf_fixtures import lora_loss_and_grads as loss_and_grads
from nanolora import cuda_graphs, kept_attention, load_model, ops
from nanolora.document_attention import find_documents
from nanolora.lora import attach_lora, lora_parameters

CUDA = torch.cuda.is_available()

# Written once per module and only read. Module-scoped, so set up before any function-scoped
# fixture: the checkpoint (transformers imports) is written before graphs_emulated patches torch.cuda.
llama = checkpoint_fixture("llama")
gemma2 = checkpoint_fixture("gemma2")


def random_batch(g, batch, seq, vocab, padded_rows=0, packed=False):
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    # a prompt of 3 to seq/4 tokens: the windows' label counts, and so the loss factor a replay
    # must take up, differ by up to ~15%
    labels[:, :int(torch.randint(3, max(4, seq // 4), (1,), generator=g))] = -100
    mask = position_ids = segment_ids = None
    if padded_rows or packed:
        mask = torch.ones(batch, seq, dtype=torch.long)
        position_ids = torch.arange(seq).repeat(batch, 1)
        for row in range(padded_rows):  # right padding of different lengths
            mask[row, seq - 2 - 3 * row:] = 0
            labels[row, seq - 2 - 3 * row:] = -100
        if packed:  # two examples in row 0, split anywhere in its middle half (so a graph's documents change)
            split = int(torch.randint(seq // 4, 3 * seq // 4, (1,), generator=g))
            segment_ids = mask.clone()
            segment_ids[0, split:] *= 2
            position_ids[0, split:] -= split
            labels[0, split] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids,
            "segment_ids": segment_ids}


@pytest.mark.parametrize("family,case", [("llama", "causal"), ("llama", "padded"), ("llama", "packed"),
                                         ("gemma2", "causal"), ("gemma2", "padded")])
def test_padding_to_a_bucket_changes_nothing(request, family, case):
    model, _ = load_model(request.getfixturevalue(family), device="cpu", dtype=torch.float32)
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model, seed=1)
    g = torch.Generator().manual_seed(1)
    model.train()
    model.grad_checkpointing = True
    batch = random_batch(g, 3, 21, model.config.vocab_size, padded_rows=2 if case == "padded" else 0,
                         packed=case == "packed")
    padded = cuda_graphs.pad_to_bucket(batch, length=lambda seq: 32)
    assert padded["input_ids"].shape == (3, 32)
    assert all((v is None) == (batch[k] is None) for k, v in padded.items())
    loss, grads = loss_and_grads(model, batch)
    loss_p, grads_p = loss_and_grads(model, padded)
    # fp32 on the CPU: only the summation order of longer rows differs
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=0)
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    assert cuda_graphs.pad_to_bucket(padded, length=lambda seq: 32) is padded  # already there: untouched


def test_bucket_lengths():
    lengths = [cuda_graphs.bucket_length(n) for n in range(1, 70000)]
    assert all(n <= b <= max(n + 63, 1.25 * n) for n, b in zip(range(1, 70000), lengths))  # at most 63 tokens or 25%
    assert [cuda_graphs.bucket_length(n) for n in (1, 64, 65, 300, 1000, 2048, 2049, 32768)] == \
        [64, 64, 128, 320, 1024, 2048, 2560, 32768]
    assert len(set(b for n, b in zip(range(1, 70000), lengths) if n <= 4096)) <= 4096 // 64 and \
        len(set(b for n, b in zip(range(1, 70000), lengths) if 2048 < n <= 4096)) == 4


def test_why_graphs_stay_off(llama):
    model, _ = load_model(llama, device="cpu", dtype=torch.float32)
    attach_lora(model, "all", r=4, alpha=8, dropout=0.1)
    cuda = torch.device("cuda")
    assert cuda_graphs.why_not(model, torch.device("cpu")) == "not on CUDA"
    assert cuda_graphs.why_not(model, cuda, world_size=2) == "under torchrun"
    assert cuda_graphs.why_not(model, cuda, full=True) == "full fine-tuning"
    assert cuda_graphs.why_not(model, cuda) == "LoRA dropout > 0"
    ops.use_kernels(False)
    try:
        assert cuda_graphs.why_not(model, cuda) == "NANOLORA_KERNELS=0"
    finally:
        ops.use_kernels(True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family,nf4,checkpointing,packed,kept", [
    ("llama", False, True, False, False), ("llama", True, True, False, False), ("llama", True, "offload", False, False),
    # fp16 (GPUs without bf16): the GradScaler's scale is read by the replays and updated between them
    ("llama", True, "offload", False, "fp16"),
    # kept attention (its output offloaded for the recompute) captured too: on for any length here
    ("llama", True, "offload", False, True),
    # packed rows: their documents (variable-length attention) padded with the rows
    ("llama", True, "offload", True, False),
    # --fp8: the base GEMMs' _scaled_mm and the row quantization captured and replayed
    ("llama", True, "offload", False, "fp8"),
    # Gemma: soft-capped attention and loss (the references), sliding windows, scaled embeddings
    ("gemma2", False, True, False, False), ("gemma3", True, "offload", True, False)],
    ids=["bf16", "nf4", "nf4-offload", "nf4-offload-fp16-scaler", "nf4-offload-kept", "nf4-offload-packed",
         "nf4-offload-fp8", "gemma2-bf16", "gemma3-nf4-offload-packed"])
def test_graphed_steps_train_as_eager_ones(tmp_path, monkeypatch, family, nf4, checkpointing, packed, kept):
    """Four AdamW steps of two micro-batches each (lengths 300 and 200, one batch with
    padding): the graphed run's losses and LoRA weights are the eager run's, given the eager
    run the same bucket-padded batches (padding changes the GEMM shapes, hence their bf16
    rounding, and AdamW's normalised update turns a sign flip of a near-zero gradient into a
    full step: measured 0.14 of the largest weight against unpadded eager, bf16). A large
    learning rate makes a stale LoRA cast in a replay (the optimizer changed A and B since the
    capture) show up at once."""
    fp16 = kept == "fp16"
    dtype = torch.float16 if fp16 else torch.bfloat16
    if kept is True:
        monkeypatch.setattr(kept_attention, "MIN_LENGTH", 0)
    monkeypatch.setattr(ops, "_fp8", kept == "fp8")
    fp8_calls = {"fp8_matmul": [], "fp8_input_grad": []}
    if kept == "fp8":  # counted, forward and backward, so that the case cannot pass with FP8 silently off
        from nanolora.kernels import lora_projections
        for name, calls in fp8_calls.items():
            real = getattr(lora_projections, name)
            monkeypatch.setattr(lora_projections, name, lambda *args, real=real, calls=calls: calls.append(1) or real(*args))
    shape = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512) if family == "llama" else {}
    save_checkpoint(tmp_path, family, **shape)
    g = torch.Generator().manual_seed(0)
    vocab = 512
    windows = [[random_batch(g, 2, 300, vocab, packed=packed), random_batch(g, 2, 200, vocab, padded_rows=1, packed=packed)]
               for _ in range(4)]
    for window in windows if packed else []:
        for mb in window:
            mb["documents"] = find_documents(mb["segment_ids"])
    runs = {}
    for graphs in (False, True, False):
        torch.manual_seed(0)
        model, _ = load_model(tmp_path, device="cuda", dtype=dtype, load_in_4bit=nf4)
        attach_lora(model, "all", r=8, alpha=16)
        model.train()
        model.grad_checkpointing = checkpointing
        params = lora_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
        # init_scale 2^10 and growth every step: the scale changes between replays
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=1, enabled=fp16)
        graphed = cuda_graphs.GraphedMicroSteps(model, params, dtype, scaler) if graphs else None
        losses = []
        for step, window in enumerate(windows):
            n = sum(int((mb["labels"] != -100).sum()) for mb in window)
            total = torch.zeros((), device="cuda")
            for mb in window:
                mb = {k: None if v is None else v.to("cuda") for k, v in mb.items()}
                if graphed and step > 0:  # both shapes captured in the first window: a replay never waits for the GPU
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        total += graphed(mb, 1.0 / n)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                elif graphed:
                    total += graphed(mb, 1.0 / n)
                else:
                    mb = cuda_graphs.pad_to_bucket(mb)
                    with torch.autocast("cuda", dtype=dtype):
                        loss = model(**mb)
                    scaler.scale(loss / n).backward()
                    total += loss.detach()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total.item() / n)
        if graphed:
            assert len(graphed.graphs) == 2 and graphed.eager_shapes == 0  # lengths 300 and 200: 320 and 256
        runs.setdefault(graphs, []).append((losses, [p.detach().float().clone() for p in params]))
    assert all(bool(calls) == (kept == "fp8") for calls in fp8_calls.values())
    (eager, eager_params), (eager2, eager2_params) = runs[False]
    (graph, graph_params), = runs[True]

    def worst(a, b):
        return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item() for x, y in zip(a, b))
    noise = worst(eager2_params, eager_params)
    print(f"losses eager {eager} graphed {graph}; LoRA weights graphed vs eager {worst(graph_params, eager_params):.3g}"
          f" (eager vs eager {noise:.3g})")
    # the same kernels on the same bytes, so equal up to what two eager runs differ by (cuDNN's
    # attention backward may sum in another order); 1e-3 leaves room for a cuBLAS algorithm
    # picked differently on the capture stream, far below a stale cast's effect
    if not packed:
        for a, b, c in zip(graph, eager, eager2):
            assert abs(a - b) <= 2 * abs(b - c) + 1e-4 * abs(b)
        assert worst(graph_params, eager_params) <= 2 * noise + 1e-3
        return
    # Packed: flash attention's variable-length backward adds dQ's partial sums with atomics, in
    # whatever order its blocks finish. Two eager runs, launched alike, agreed bit for bit on an
    # H200, but the graphed run's third loss differed by 1.7e-4 relative (its first two equal),
    # and at lr 1e-2 AdamW turns that into sign flips of near-zero updates (weights 0.27 apart).
    # A stale LoRA cast would move the second step's loss by a whole step's change (~1e-2).
    for a, b in zip(graph, eager):
        assert abs(a - b) <= 1e-3 * abs(b)


@pytest.fixture
def graphs_emulated(monkeypatch):
    """CUDA graphs emulated on the CPU, to test GraphedMicroSteps' bookkeeping in CI: a
    "capture" runs the step but then restores every gradient (a real capture runs nothing),
    and a replay runs the captured step again on the captured inputs, writing the captured
    loss tensor (a real replay writes the same memory). Streams and devices are no-ops."""
    import contextlib

    capturing = []
    real_micro_step = cuda_graphs.GraphedMicroSteps._micro_step

    class Graph:
        def replay(self):
            # a real graph adds into the very .grad tensors that existed at its capture
            assert all(p.grad is g for p, g in zip(self.owner.params, self.grads)), "gradients replaced"
            self.loss.copy_(real_micro_step(self.owner, self.inputs))

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        owner = capturing_owner[0]
        saved = [p.grad.clone() for p in owner.params]
        capturing.append(g)
        try:
            yield
        finally:
            capturing.pop()
            for p, s in zip(owner.params, saved):
                p.grad.copy_(s)
            g.grads = [p.grad for p in owner.params]

    capturing_owner = [None]

    def micro_step(self, inputs):
        capturing_owner[0] = self
        loss = real_micro_step(self, inputs)
        if capturing:
            capturing[-1].owner, capturing[-1].inputs, capturing[-1].loss = self, inputs, loss
        return loss

    class Stream:  # classes, not lambdas: transformers annotates with `torch.cuda.Stream | None`
        def __init__(self, device=None): pass
        def wait_stream(self, other): pass

    class Device(contextlib.nullcontext):
        pass

    monkeypatch.setattr(cuda_graphs.GraphedMicroSteps, "_micro_step", micro_step)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the wrapper's autocast("cuda") on CPU tensors
def test_graphed_micro_steps_bookkeeping_on_cpu(llama, graphs_emulated, capsys):
    """Three AdamW steps of two micro-batches of three lengths (so one runs eagerly past
    MAX_GRAPHS = 2), the optimizer setting gradients to None in between: the wrapper's losses
    and LoRA weights equal a plain loop's on the same bucket-padded batches, bit for bit
    (fp32, the same ops). Fails if captured inputs are not refreshed, if gradients the optimizer
    dropped are not restored as zeros, or if a "capture" counted its micro-batch twice."""
    g = torch.Generator().manual_seed(0)
    windows = [[random_batch(g, 2, 21, 512), random_batch(g, 2, 70, 512, padded_rows=1)],
               [random_batch(g, 2, 21, 512), random_batch(g, 2, 150, 512)],
               [random_batch(g, 2, 70, 512, padded_rows=1), random_batch(g, 2, 150, 512)]]
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model, _ = load_model(llama, device="cpu", dtype=torch.float32)
        attach_lora(model, "all", r=4, alpha=8)
        model.train()
        model.grad_checkpointing = True
        params = lora_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        steps = cuda_graphs.GraphedMicroSteps(model, params, torch.float32, torch.amp.GradScaler("cpu", enabled=False)) \
            if graphed else None
        losses = []
        for window in windows:
            n = sum(int((mb["labels"] != -100).sum()) for mb in window)
            total = 0.0
            for mb in window:
                if steps:
                    total += steps(mb, 1.0 / n).item()
                else:
                    loss = model(**cuda_graphs.pad_to_bucket(mb))
                    (loss / n).backward()
                    total += loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total / n)
        results.append((losses, [p.detach().clone() for p in params]))
        if steps:
            assert len(steps.graphs) == 2 and steps.eager_shapes == 2  # lengths 64, 128 graphed; 160 eager
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    assert graph_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(graph_params, eager_params))
    assert capsys.readouterr().err.count("new ones run eagerly") == 1
