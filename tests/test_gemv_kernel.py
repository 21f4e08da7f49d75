"""loraserve's bf16 GEMV (`kernels/csrc/gemv_cpu.cpp`, behind `Linear.forward_into` and a packed `Linear`'s one-row
forward) against a bf16 linear layer.

The op sums in fp32 in its own order and rounds each result to bf16 once, as a bf16 matmul does, so its values equal
the exactly rounded product except where the fp32 sums straddle a bf16 rounding boundary: there they are one bf16
step apart. The tolerance is that step plus the fp32 error bound of a K-term sum, K * 2^-23 * sum |x w|.
"""

from __future__ import annotations

import pytest
import torch

from loraserve import kernels
from loraserve.layers.context import ForwardContext, forward_context
from loraserve.layers.linear import (GEMV_MAX_ROWS, PROJECTION_GEMV_MAX_ROWS, Linear, ProjectionGroup,
                                     cpu_packing_applies, fuse_projection_groups, pack_linear_weights)
from loraserve.layers.lora import OutputLoRA, ProjectionLoRA
from loraserve.layers.lora_ops import LoRABatch

pytestmark = pytest.mark.skipif(kernels.extension() is None, reason="compiled CPU ops unavailable here")

def around(limit: int | None) -> list[int]:
    """Row counts either side of a GEMV row limit (None: the GEMV takes any number, so a few and a batch)."""
    return [1, 3, 32] if limit is None else sorted({1, 3, max(limit, 1), limit + 1, 32})


def takes(rows: int, limit: int | None) -> bool:
    return limit is None or rows <= limit


PACKS = cpu_packing_applies(torch.bfloat16, torch.device("cpu"))  # oneDNN has bf16 on this CPU
SHAPES = [(37, 45), (1000, 33), (17, 64), (23, 50), (129, 1), (300, 640), (2049, 100)]  # N, K: tails past 32 and 16


def case(n: int, k: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator).bfloat16()
    x = (torch.randn(rows, k, generator=generator) * torch.logspace(-2, 1, rows)[:, None]).bfloat16()
    return x, w


def assert_close_to_bf16_product(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    expected = (x.float() @ w.float().T).bfloat16().float()
    magnitude = x.double().abs() @ w.double().abs().T
    bound = expected.abs() * 2.0**-7 + 2 * x.shape[1] * 2.0**-23 * magnitude.float() + 1e-30
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert ((got - expected).abs() <= bound).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", range(1, 10))
def test_op_matches_a_bf16_product(shape: tuple[int, int], rows: int) -> None:
    x, w = case(*shape, rows)
    out = torch.full((rows, shape[0]), float("nan"))
    assert torch.ops.loraserve.bf16_linear_fp32_(out, x, w) is out
    assert_close_to_bf16_product(out, x, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 9])
def test_bf16_output_form_holds_the_same_values(shape: tuple[int, int], rows: int) -> None:
    x, w = case(*shape, rows)
    got = torch.ops.loraserve.bf16_linear(x, w)
    out = torch.empty(rows, shape[0])
    torch.ops.loraserve.bf16_linear_fp32_(out, x, w)
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), out)


@pytest.mark.parametrize("rows", around(PROJECTION_GEMV_MAX_ROWS))
def test_projection_streams_its_plain_weight_at_few_rows(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed where this CPU's oneDNN has bf16 (the plain copy kept beside), plain where it has not."""
    model = torch.nn.Sequential(Linear(640, 300))
    _, w = case(300, 640, 1, seed=4)
    model[0].weight = torch.nn.Parameter(w, requires_grad=False)
    if PACKS:
        pack_linear_weights(model)
    linear = model[0]
    assert (linear.packed_weight is not None) == PACKS and linear.weight is not None
    calls = []
    op = kernels.compiled_op("bf16_linear")
    monkeypatch.setitem(kernels._ops, "bf16_linear", lambda *a: calls.append(1) or op(*a))
    x, _ = case(300, 640, rows, seed=5)
    got = linear(x)
    assert calls == ([1] if takes(rows, PROJECTION_GEMV_MAX_ROWS) else [])
    assert got.dtype == torch.bfloat16
    assert_close_to_bf16_product(got.float(), x, w)


def test_op_results_are_bf16_values_and_rows_are_independent() -> None:
    x, w = case(500, 96, 9)
    x[3] = 0
    out = torch.empty(9, 500)
    torch.ops.loraserve.bf16_linear_fp32_(out, x, w)
    assert torch.equal(out.bfloat16().float(), out) and torch.equal(out[3], torch.zeros(500))
    single = torch.empty(1, 500)
    torch.ops.loraserve.bf16_linear_fp32_(single, x[5:6].contiguous(), w)
    assert torch.equal(single[0], out[5])


def test_op_rejects_mismatched_buffers() -> None:
    x, w = case(64, 32, 2)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.loraserve.bf16_linear_fp32_(torch.empty(2, 63), x, w)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.loraserve.bf16_linear_fp32_(torch.empty(2, 64), x.float(), w)


def lm_head(n: int, k: int, packed: bool) -> Linear:
    _, w = case(n, k, 1, seed=1)
    linear = Linear(k, n)
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    if packed:
        linear.pack_for_cpu(release_plain=False)  # the plain table stays, as when an embedding shares it
    return linear


@pytest.mark.parametrize("packed", [pytest.param(True, id="packed"), pytest.param(False, id="plain")] if PACKS
                         else [pytest.param(False, id="plain")])
@pytest.mark.parametrize("rows", around(GEMV_MAX_ROWS))
def test_linear_forward_into_matches_its_forward(packed: bool, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    linear = lm_head(3001, 640, packed)
    x, _ = case(3001, 640, rows, seed=2)
    calls = []
    op = kernels.compiled_op("bf16_linear_fp32_")
    monkeypatch.setitem(kernels._ops, "bf16_linear_fp32_", lambda *a: calls.append(1) or op(*a))
    out = torch.full((rows, 3001), float("nan"))
    assert linear.forward_into(x, out) is out
    assert calls == ([1] if takes(rows, GEMV_MAX_ROWS) else [])
    assert_close_to_bf16_product(out, x, linear.weight)
    assert_close_to_bf16_product(linear(x).float(), x, linear.weight)


def test_linear_forward_into_keeps_an_adapters_delta() -> None:
    linear = lm_head(300, 64, packed=PACKS)
    lora = OutputLoRA()
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 64, generator=generator).bfloat16(), torch.randn(300, 4, generator=generator).bfloat16()
    lora.place(0, a, b)
    linear.lora = lora
    x, _ = case(300, 64, 2, seed=4)
    context = ForwardContext(slot_mapping=torch.empty(0, dtype=torch.int64), attention_groups=[],
                             lora=LoRABatch.build([0, -1], torch.device("cpu")))
    with forward_context(context):
        out = linear.forward_into(x, torch.empty(2, 300))
        assert torch.equal(out, linear(x).float())
    base = ForwardContext(slot_mapping=torch.empty(0, dtype=torch.int64), attention_groups=[])
    with forward_context(base):  # no row carries an adapter: the GEMV serves
        assert_close_to_bf16_product(linear.forward_into(x, torch.empty(2, 300)), x, linear.weight)


@pytest.mark.parametrize("rows", around(GEMV_MAX_ROWS))
def test_a_step_whose_adapters_leave_the_head_alone_takes_the_gemv(rows: int, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    linear = lm_head(300, 64, packed=PACKS)
    linear.lora = OutputLoRA()
    generator = torch.Generator().manual_seed(5)
    linear.lora.place(0, torch.randn(4, 64, generator=generator).bfloat16(),
                      torch.randn(300, 4, generator=generator).bfloat16())
    calls = []
    op = kernels.compiled_op("bf16_linear_fp32_")
    monkeypatch.setitem(kernels._ops, "bf16_linear_fp32_", lambda *a: calls.append(1) or op(*a))
    x, _ = case(300, 64, rows, seed=6)
    for slots, delta in (([1, -1] * rows)[:rows], False), (([0, 1] * rows)[:rows], True):
        calls.clear()
        context = ForwardContext(slot_mapping=torch.empty(0, dtype=torch.int64), attention_groups=[],
                                 lora=LoRABatch.build(slots, torch.device("cpu")))
        with forward_context(context):  # slot 1 holds no delta for the head
            out = linear.forward_into(x, torch.empty(rows, 300))
            if delta:  # the layer's own forward, delta included, as before
                assert torch.equal(out, linear(x).float())
        assert calls == ([1] if takes(rows, GEMV_MAX_ROWS) and not delta else [])
        if not delta:
            assert_close_to_bf16_product(out, x, linear.weight)


def projections(sizes: list[int], k: int) -> torch.nn.Sequential:
    """Linears of one input, as a model holds q/k/v, with the group a model module would hold beside them."""
    model = torch.nn.Sequential(*(Linear(k, n) for n in sizes))
    for i, linear in enumerate(model):
        linear.weight = torch.nn.Parameter(case(linear.out_features, k, 1, seed=10 + i)[1], requires_grad=False)
    if PACKS:
        pack_linear_weights(model)
    model.group = ProjectionGroup(*model)
    return model


@pytest.mark.parametrize("rows", around(PROJECTION_GEMV_MAX_ROWS))
def test_a_fused_group_gives_each_layers_own_output(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit what each layer gives alone, adapter deltas included, in one GEMV call where it applies; the
    layers' weights become views of the group's, with no copy kept."""
    sizes, k = [300, 64, 40], 640
    model = projections(sizes, k)
    generator = torch.Generator().manual_seed(7)
    for linear, slot in ((model[0], 0), (model[2], 1)):  # the middle layer carries no adapter
        lora = ProjectionLoRA(k, linear.out_features, torch.bfloat16, torch.device("cpu"))
        for placed in (slot, 2):
            lora.place(placed, torch.randn(4, k, generator=generator).bfloat16(),
                       torch.randn(linear.out_features, 4, generator=generator).bfloat16())
        linear.lora = lora
    x, _ = case(1, k, rows, seed=8)
    slots = [[0, 1, 2, -1][i % 4] for i in range(rows)]
    context = ForwardContext(slot_mapping=torch.empty(0, dtype=torch.int64), attention_groups=[],
                             lora=LoRABatch.build(slots, torch.device("cpu")))
    with forward_context(context):
        alone = [linear(x) for linear in model]
        assert fuse_projection_groups(model) == 1
        calls = []
        op = kernels.compiled_op("bf16_linear_parts")
        monkeypatch.setitem(kernels._ops, "bf16_linear_parts", lambda *a: calls.append(1) or op(*a))
        together = model.group(x)
    assert calls == ([1] if takes(rows, PROJECTION_GEMV_MAX_ROWS) else [])
    assert all(torch.equal(a, t) and t.is_contiguous() for a, t in zip(alone, together))
    merged = model.group.weight
    assert merged.shape == (sum(sizes), k)
    assert [linear.weight.data_ptr() for linear in model] == [
        merged.data_ptr() + start * k * merged.element_size() for start in (0, 300, 364)]


def test_a_group_runs_each_layer_once_a_weight_is_replaced() -> None:
    model = projections([48, 16], 96)
    assert fuse_projection_groups(model) == 1
    model[1].weight = torch.nn.Parameter(case(16, 96, 1, seed=20)[1], requires_grad=False)
    model[1].packed_weight = None
    x, _ = case(1, 96, 1, seed=21)
    first, second = model.group(x)
    assert torch.equal(first, model[0](x)) and torch.equal(second, model[1](x))
    assert_close_to_bf16_product(second.float(), x, model[1].weight)


def test_a_group_with_a_bias_is_left_as_it_is() -> None:
    model = torch.nn.Sequential(Linear(32, 16, bias=True), Linear(32, 16))
    model.group = ProjectionGroup(*model)
    weights = [linear.weight for linear in model]
    assert fuse_projection_groups(model) == 0 and model.group.weight is None
    assert all(linear.weight is weight for linear, weight in zip(model, weights))


def test_parts_op_rejects_sizes_that_do_not_cover_w() -> None:
    x, w = case(64, 32, 2)
    with pytest.raises(RuntimeError, match="sizes sum to 60"):
        torch.ops.loraserve.bf16_linear_parts(x, w, [30, 30])
