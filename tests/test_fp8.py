"""--fp8 (kernels/fp8_matmul.py): the frozen base's GEMMs in float8 e4m3, forward and input
gradient, against torch references that round the same way and multiply in fp32.

The quantization into e4m3 is checked bit for bit (the row kernel, the transposed kernels and
the NF4 path against torch's arithmetic); the products within bf16 steps of their fp32
references; the fused projections and MLP against references built from those; and a whole
step against the same step without FP8 (FP8's own error: the loss within 1%, the gradients
pointing the same way). The 200-step loss curve on the GPU (bench/offload_curve.py --variant
fp8) is issue 8's check of what FP8 costs in training. Helpers, and the autouse fixture that
puts the fused path on and FP8 off after each test, are tests/test_kernels.py's.
"""
import pytest
import torch

from nanolora import ops
from nanolora.kernels.fp8_matmul import transposed_e4m3
from nanolora.nf4 import dequantize_nf4, quantize_nf4
# fused_path: the autouse fixture (imported, it applies here too)
from test_kernels import CUDA, DEVICE, fused_path, layers_for, lora_model, rel_err, run  # noqa: F401


def fp8_weight_reference(weight, dtype):
    """lora_projections.fp8_weight's definition: an NF4 weight whose rows are whole blocks
    scaled row by row from its float32 values (nanolora.nf4.dequantize_nf4) to 448 at each
    row's row_absmax; any other weight by quantize_rows of its dense form."""
    from nanolora.kernels.fp8_matmul import E4M3_MAX, quantize_rows_reference
    if getattr(weight, "row_absmax", None) is None:
        return quantize_rows_reference(ops.dense_weight(weight, dtype))
    inverse = E4M3_MAX / weight.row_absmax.clamp(min=1e-30)
    w8 = (dequantize_nf4(weight, torch.float32) * inverse[:, None]).to(torch.float8_e4m3fn)
    return w8, inverse.reciprocal()[:, None]


def fp8_projection_reference(x, layer):
    """projection_reference with the base GEMM as kernels/fp8_matmul.py defines it: x and W
    rounded to e4m3 by row, multiplied in fp32, rounded to bf16 (shapes _scaled_mm cannot
    take stay in the compute dtype, as in the fused path)."""
    from nanolora.kernels.fp8_matmul import fits, quantize_rows_reference
    x2d = x.reshape(-1, x.shape[-1])
    if fits(layer.weight):
        (x8, x_scale), (w8, w_scale) = quantize_rows_reference(x2d), fp8_weight_reference(layer.weight, x.dtype)
        y = ((x8.float() * x_scale) @ (w8.float() * w_scale).T).to(torch.bfloat16).to(x.dtype)
    else:
        y = x2d @ ops.dense_weight(layer.weight, x.dtype).T
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    if ops.has_lora(layer):
        y = y + (x2d @ layer.lora_A.to(x.dtype).T * layer.scale) @ layer.lora_B.to(x.dtype).T
    return y.view(*x.shape[:-1], -1)


def fp8_input_grad_reference(dy, layer):
    """dL/dx of one projection as --fp8's backward defines it, for dy [T, out]: the base term
    by fp8_matmul.fp8_input_grad_reference over fp8_weight_reference's rows (transposed)
    where the weight takes FP8 (in the compute dtype elsewhere), plus the LoRA term s dy B A."""
    from nanolora.kernels import fp8_matmul
    if fp8_matmul.fits(layer.weight):
        w8, w_scale = fp8_weight_reference(layer.weight, dy.dtype)
        dx = fp8_matmul.fp8_input_grad_reference(dy, transposed_e4m3(w8), w_scale).to(dy.dtype)
    else:
        dx = dy @ ops.dense_weight(layer.weight, dy.dtype)
    if ops.has_lora(layer):
        dx = dx + (dy @ layer.lora_B.to(dy.dtype) * layer.scale) @ layer.lora_A.to(dy.dtype)
    return dx


@pytest.mark.parametrize("shape", [(24, 64, 48), (7, 96, 32), (5, 128, 16)], ids=str)
def test_fp8_matmul_equals_its_reference(shape):
    """_scaled_mm on the row-scaled e4m3 operands against the same roundings multiplied in
    fp32: within one bf16 step of the output (both round an fp32 sum once; the sums may differ
    in order, so an output may round to the neighbouring bf16 value, up to 2^-7 of itself; on
    the GPU, 2^-7.7 of the largest output was seen). The e4m3 rounding is really there: against the unrounded x W^T the error
    is FP8's (3 mantissa bits: percents), far above bf16's."""
    from nanolora.kernels.fp8_matmul import fp8_matmul, fp8_matmul_reference, quantize_rows
    tokens, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(DEVICE, torch.bfloat16)
    got = fp8_matmul(*quantize_rows(x), *quantize_rows(w))
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, d_out)
    assert rel_err(got, fp8_matmul_reference(x, w)) <= 2 ** -7
    assert 5e-3 < rel_err(got, x.float() @ w.float().T) < 0.1



@pytest.mark.parametrize("shape", [(24, 64, 48), (7, 96, 32), (5, 128, 16)], ids=str)
def test_fp8_input_grad_equals_its_reference(shape):
    """dy W with W's row scales folded into dy's columns, on W's e4m3 bytes transposed, against
    the same roundings multiplied in fp32: within one bf16 step, as the forward. Against the unrounded
    dy W the error is FP8's, as in the forward; and the folding is really there: dy rounded
    without W's scales folded in gives another result."""
    from nanolora.kernels.fp8_matmul import fp8_input_grad, fp8_input_grad_reference, quantize_rows
    tokens, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(tokens, d_out, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(d_out, d_in, generator=g) * torch.logspace(-2, 1, d_out, dtype=torch.float32)[:, None]
         ).to(DEVICE, torch.bfloat16)  # rows of very different sizes: their scales matter
    w8, w_scale = quantize_rows(w)
    got = fp8_input_grad(dy, transposed_e4m3(w8), w_scale)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, d_in)
    assert rel_err(got, fp8_input_grad_reference(dy, transposed_e4m3(w8), w_scale)) <= 2 ** -7
    assert 5e-3 < rel_err(got, dy.float() @ w.float()) < 0.1
    dy8, dy_scale = quantize_rows(dy)
    unfolded = ((dy8.float() * dy_scale) @ (w8.float() * w_scale)).to(torch.bfloat16)
    assert rel_err(got, unfolded) > 1e-3


@pytest.fixture(scope="module")
def fp8_kernels():
    """kernels/fp8_matmul.py compiled on a GPU; on the CPU, a copy whose scaling kernel runs in
    Triton's interpreter. (Not the interpreted copy on a GPU machine: Triton 3.6's interpreter
    there fails on a loop bounded by a kernel argument, a numpy conversion error.)"""
    from nanolora.kernels import fp8_matmul
    if CUDA:
        return fp8_matmul
    from triton_interpreter import interpreted_copy
    return interpreted_copy(fp8_matmul)


KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.float8_e4m3fn] if CUDA else [])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (40, 1000), (3, 4100), (0, 64)], ids=str)
@pytest.mark.parametrize("column_scaled", [False, True], ids=["rows", "columns-too"])
def test_quantize_rows_kernel_equals_torch(fp8_kernels, dtype, shape, column_scaled):
    """The row kernel (each value times its column's factor if given, each row's max |value|,
    the row times 448 / max in fp32, one cast, the scale 1 / inverse) against
    quantize_rows_reference's torch arithmetic, bit for bit, for rows of 1e-3 to 1e3 that end
    inside or at the kernel's 1024-value steps, a row of zeros, a row with one NaN (all NaN
    after, scale too, as in torch) and none; column factors of 1e-4 to 1e-1 (W's row scales,
    as fp8_input_grad folds them in). Interpreted, in fp32 and fp16 only: the interpreter's
    casts to bf16 and e4m3 are wrong; compiled on a GPU, e4m3 too
    (test_gpu_quantize_rows_equals_reference checks it on an 8B activation's shape)."""
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]).bfloat16().to(DEVICE)
    if shape[0]:
        t[shape[0] // 2] = 0
        t[-1, shape[1] // 3] = float("nan")
    column_scale = (torch.logspace(-4, -1, shape[1])[torch.randperm(shape[1], generator=g)].to(DEVICE)
                    if column_scaled else None)
    values = t if column_scale is None else t.float() * column_scale
    inverse = fp8_kernels.row_inverses(values)
    out, scale = fp8_kernels.quantize_rows_triton(t, column_scale, dtype)
    exactly = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out.float(), (values.float() * inverse).to(dtype).float(), **exactly)
    torch.testing.assert_close(scale, inverse.reciprocal(), **exactly)
    assert not shape[0] or (out[-1].float().isnan().all() and scale[-1].isnan())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 64), (80, 200), (5, 130), (0, 64)], ids=str)
def test_transposed_quantize_kernel_equals_torch(fp8_kernels, dtype, shape):
    """quantize_rows_transposed's kernel (each row times its inverse in fp32, cast, stored
    transposed) against torch's arithmetic transposed, bit for bit, the scales equal, with
    shapes that fill the kernel's 64 x 64 tiles, leave them part-filled, or are empty."""
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]).bfloat16().to(DEVICE)
    inverse = fp8_kernels.row_inverses(t)
    out, scale = fp8_kernels.quantize_rows_transposed_triton(t, dtype)
    assert out.shape == (shape[1], shape[0]) and out.is_contiguous()
    assert torch.equal(out.float(), (t.float() * inverse).to(dtype).float().T) and torch.equal(scale, inverse.reciprocal())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_quantize_rows_equals_reference():
    """quantize_rows' kernel path against the torch reference, bit for bit (its e4m3 cast:
    round to nearest even, every value in range), on an 8B activation's shape, without and
    with column factors; and the transposed kernel's bytes, against the reference's transposed."""
    from nanolora.kernels.fp8_matmul import quantize_rows, quantize_rows_reference, quantize_rows_transposed
    t = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 3
    (t8, scale), (r8, r_scale) = quantize_rows(t), quantize_rows_reference(t)
    assert torch.equal(t8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(scale, r_scale)
    column_scale = torch.rand(14336, device="cuda") * 1e-2  # fp8_input_grad's W row scales
    (t8, scale), (r8, r_scale) = quantize_rows(t, column_scale), quantize_rows_reference(t, column_scale)
    assert torch.equal(t8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(scale, r_scale)
    (t8t, scale), (r8, r_scale) = quantize_rows_transposed(t), quantize_rows_reference(t)
    assert torch.equal(t8t.view(torch.uint8), r8.view(torch.uint8).T) and torch.equal(scale, r_scale)


def test_fp8_rows_are_scaled_to_e4m3s_largest_value():
    """quantize_rows and the NF4 path of lora_projections.fp8_weight put each row's largest
    |value| at 448 exactly (all of e4m3's range used), and round every value in e4m3's normal
    range (at least 2^-6 of 448) to within 2^-4 of itself: 3 mantissa bits, half a step."""
    from nanolora.kernels.fp8_matmul import quantize_rows
    from nanolora.kernels.lora_projections import fp8_weight
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 128, generator=g) * torch.logspace(-4, 4, 40)[:, None]
    nf4_weight = quantize_nf4(torch.randn(40, 128, generator=g).to(DEVICE))
    for original, (t8, scale) in ((t, quantize_rows(t.to(DEVICE))),
                                  (dequantize_nf4(nf4_weight, torch.float32).cpu(), fp8_weight(nf4_weight, torch.float32))):
        values = t8.float().cpu()
        assert torch.equal(values.abs().amax(1), torch.full((40,), 448.0))
        normal = values.abs() >= 448 * 2 ** -6
        back = values * scale.cpu()
        assert torch.all((back - original).abs()[normal] <= 2 ** -4 * original.abs()[normal])


@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
def test_fp8_transposed_weight_is_the_forward_ones_bytes(nf4):
    """fp8_weight(transposed=True), what the FP8 input gradient reads, is the forward's e4m3
    weight with its bytes transposed and the same row scales, for an NF4 weight (its transposed
    kernel) and a 16-bit one (quantize_rows_transposed), with rows that are not a whole tile."""
    from nanolora.kernels.lora_projections import fp8_weight
    w = torch.randn(80, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    weight = quantize_nf4(w) if nf4 else w.to(torch.bfloat16)
    (w8t, t_scale), (w8, scale) = fp8_weight(weight, torch.float32, transposed=True), fp8_weight(weight, torch.float32)
    assert w8t.shape == (128, 80) and torch.equal(w8t.view(torch.uint8), w8.view(torch.uint8).T)
    assert torch.equal(t_scale, scale)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
@pytest.mark.parametrize("hidden", [64, 72])
def test_fp8_projections_match_reference(dtype, nf4, hidden):
    """--fp8's fused q/k/v projections against fp8_projection_reference: the same base
    product (one bf16 step apart at most, test_fp8_matmul_equals_its_reference) plus the LoRA update
    and bias added in the compute dtype: within 2^-7 of the largest output (a 24-wide
    projection cannot take _scaled_mm and stays unrounded on both sides). Backward: dL/dx
    against fp8_input_grad_reference summed over the projections, within 2^-6: each side
    rounds each projection's term and each partial sum to bf16, in another order, so the two
    may sit two bf16 steps apart (2^-7 of the largest value was exceeded on the GPU:
    0.00787); the LoRA gradients do not read dL/dx, nor the forward's outputs (the
    projections are linear), so with the same loss weights they equal the non-FP8 path's
    exactly. hidden 72 is no multiple of 16: nothing takes FP8 (on a GPU, _scaled_mm would
    refuse it), and outputs and dL/dx are the non-FP8 path's exactly."""
    from nanolora.kernels.lora_projections import lora_projections
    spec = [((hidden, 48, 16), True, 0), ((hidden, 24, 4), True, 1), ((hidden, 32, None), False, 2)]
    layers, _ = layers_for(spec, dtype, nf4)
    x = torch.randn(2, 9, hidden, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)

    def fused(fp8):
        def fn(x):
            states, compute = ops._fused_projections(x, layers)
            return lora_projections(x, states, compute, ops.lora_A_stacked(layers, states), fp8)
        return fn
    out_fp8, dx_fp8, grads_fp8 = run(fused(True), x, layers)
    out_plain, dx_plain, grads_plain = run(fused(False), x, layers)
    for got, layer in zip(out_fp8, layers):
        assert rel_err(got, fp8_projection_reference(x, layer)) <= 2 ** -7
    g = torch.Generator().manual_seed(1)  # run()'s loss weights: dL/dy of each output
    dys = [torch.randn(o.shape, generator=g).to(DEVICE, dtype).reshape(-1, o.shape[-1]) for o in out_fp8]
    dx_reference = sum(fp8_input_grad_reference(dy, layer) for dy, layer in zip(dys, layers))
    assert rel_err(dx_fp8, dx_reference.view(x.shape)) <= 2 ** -6
    if hidden % 16:
        assert all(torch.equal(a, b) for a, b in zip(out_fp8, out_plain)) and torch.equal(dx_fp8, dx_plain)
    else:  # the 48-wide projection did go through FP8, both ways
        assert rel_err(out_fp8[0], out_plain[0]) > 1e-3 and rel_err(dx_fp8, dx_plain) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(grads_fp8, grads_plain))


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
def test_fp8_mlp_matches_reference(dtype, nf4, monkeypatch):
    """--fp8's fused MLP against the reference MLP built from fp8_projection_reference. The two
    compute h = silu(e) g differently (fp32 in the kernel, the compute dtype in torch), so an
    h near an e4m3 rounding boundary can round the other way before the down GEMM: one e4m3
    step (1/8 relative) of one term of a 128-term sum. In fp32 none did (bound 1e-5, while a
    down projection left out of FP8 misses by ~7e-3), on the CPU, where the interpreter's exp is
    torch's. On the GPU, Triton's exp and torch's differ in the last bits, and fp32 h did round
    the other way (5e-4 and 2e-3 of the largest output); bf16's coarser h may anywhere: bound
    1e-2 for both.
    Gradients: the backward runs from the FP8 forward's e and g, and its three input
    gradients run in FP8 too (counted: each is fp8_input_grad, whose arithmetic
    test_fp8_projections_match_reference checks against its reference), so they differ from
    the non-FP8 path's by FP8's error (bound 10%), and must not be equal."""
    from nanolora.kernels import lora_projections
    input_grads = []
    real = lora_projections.fp8_input_grad
    monkeypatch.setattr(lora_projections, "fp8_input_grad", lambda *args: input_grads.append(1) or real(*args))
    spec = [((64, 128, 16), False, 0), ((64, 128, 16), False, 1), ((128, 64, 8), False, 2)]
    layers, _ = layers_for(spec, dtype, nf4)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)

    def reference(x):
        e, g = fp8_projection_reference(x, layers[0]), fp8_projection_reference(x, layers[1])
        return fp8_projection_reference(torch.nn.functional.silu(e) * g, layers[2])
    ops.use_fp8(True)
    out_fp8, dx_fp8, grads_fp8 = run(lambda x: ops.gated_mlp(x, *layers), x, layers)
    ops.use_fp8(False)
    out_plain, dx_plain, grads_plain = run(lambda x: ops.gated_mlp(x, *layers), x, layers)
    assert len(input_grads) == 3  # down's, then gate's and up's
    assert rel_err(out_fp8[0], reference(x)) <= (1e-5 if dtype == torch.float32 and not CUDA else 1e-2)
    assert 0 < rel_err(dx_fp8, dx_plain) <= 0.1
    for a, b in zip(grads_fp8, grads_plain):
        assert 0 < rel_err(a, b) <= 0.1


@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
def test_fp8_training_step_is_near_the_plain_one(tmp_path, nf4, monkeypatch):
    """A whole llama step with --fp8 (every projection's base GEMM through _scaled_mm where the
    shapes allow, forward and input gradient) against the same step without: the loss within
    1% (measured 0.04-0.2% on the CPU) and the LoRA gradients pointing the same way (cosine
    over all of them measured 0.992; bound 0.95) but not equal. The 200-step loss curve on
    the GPU is issue 8's check of what FP8 costs in training (bench/offload_curve.py --variant
    fp8)."""
    from nanolora.kernels import lora_projections
    from nanolora.lora import lora_parameters
    input_grads = []  # counted, so that the case cannot pass with FP8's backward silently off
    real = lora_projections.fp8_input_grad
    monkeypatch.setattr(lora_projections, "fp8_input_grad", lambda *args: input_grads.append(1) or real(*args))
    model, g = lora_model(tmp_path, "llama", nf4)
    ids = torch.randint(0, 512, (2, 24), generator=g).to(DEVICE)

    def step(fp8):
        ops.use_fp8(fp8)
        for p in lora_parameters(model):
            p.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(ids, labels=ids)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in lora_parameters(model)])
    (loss_fp8, grads_fp8), (loss, grads) = step(True), step(False)
    assert input_grads  # (not every projection's: 24-wide ones cannot, nor the first q/k/v, whose x needs none)
    assert abs(loss_fp8 - loss) <= 0.01 * abs(loss)
    cosine = torch.nn.functional.cosine_similarity(grads_fp8.double(), grads.double(), dim=0).item()
    assert 0.95 <= cosine < 1, cosine
