"""The projection every model file uses for the weights LoRA can target and quantization can replace.

Model code only ever builds `Linear`; what a weight is stored as (float, oneDNN-packed bf16 or int8/int4) and whether a
per-token adapter delta is added on top are decided outside the model, by `quantize` or `set_quantized` (at load)
or attaching `lora`. Module names equal checkpoint names, so PEFT's `target_modules` address these layers directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loraserve import kernels
from loraserve.layers.context import get_forward_context
from loraserve.layers.embedding import VocabEmbedding
from loraserve.quant import QuantizedWeight, quantize


def _gemv_row_limits() -> tuple[int | None, int | None]:
    """The most rows the compiled GEMV takes for the lm_head and for a decoder projection (None: any number).

    At more, oneDNN's bf16 GEMM is as fast or faster (RESULTS.md, the lm_head GEMV); on AMX that comes at fewer rows,
    and a projection's weights are small enough that oneDNN's fixed costs matter less. Where oneDNN has no bf16 GEMM
    (CPUs without AVX-512), torch's own bf16 matmul is slower than the compiled kernel at every row count measured,
    so the kernel takes them all. Its portable scalar form (no AVX2) never wins.
    """
    if not kernels.vector_isa():
        return 0, 0
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None, None
    return (2, 1) if kernels.onednn_uses_amx() else (8, 2)


GEMV_MAX_ROWS, PROJECTION_GEMV_MAX_ROWS = _gemv_row_limits()


def _fits(rows: int, limit: int | None) -> bool:
    return limit is None or rows <= limit


class LoRADelta(Protocol):
    """What the adapter runtime attaches to a layer: adds the batched delta for the current step's adapters."""

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def adds_to_step(self) -> bool:
        """Whether a row of the current step uses an adapter this layer holds a delta for."""
        ...


class Linear(nn.Module):
    """`y = x W^T (+ b)`, with an optional batched LoRA delta added on top."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora: LoRADelta | None = None
        self.packed_weight: torch.Tensor | None = None  # oneDNN blocked layout, see `pack_for_cpu`
        self.quantized: QuantizedWeight | None = None  # int8/int4 in place of the float weight

    def pack_for_cpu(self, release_plain: bool) -> None:
        """Reorder the weight once into oneDNN's blocked layout.

        Results are bit-identical and bf16 matmuls run 1.3-1.8x faster on CPUs with AVX512-BF16/AMX, because oneDNN
        no longer re-lays the whole weight out on every call (the lm_head of Gemma 3 270M: 45 -> 28 ms at batch 1).
        The plain copy is released unless another module shares it (a tied embedding table).
        """
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        if release_plain:
            self.register_parameter("weight", None)

    def quantize(self, fmt: str, release_plain: bool, name: str = "") -> None:
        """Replace the float weight by `fmt` (see loraserve.quant); an adapter's delta stays in the activation dtype,
        on top of the quantized base, as in QLoRA. The plain copy is released unless another module shares it."""
        self._hold_quantized(quantize(self.weight.detach(), fmt, name), release_plain)

    def set_quantized(self, weight: QuantizedWeight) -> None:
        """Take a weight that arrived already quantized (a GGUF file's 4-bit blocks); the float parameter, never
        filled, is dropped, so `load_weights` does not ask for it."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"a {weight.out_features}x{weight.in_features} weight does not fit a "
                             f"{self.out_features}x{self.in_features} layer")
        self._hold_quantized(weight, release_plain=True)

    def _hold_quantized(self, weight: QuantizedWeight, release_plain: bool) -> None:
        """The quantized weight replaces the packed copy and, unless another module shares it, the plain one."""
        self.quantized = weight
        self.packed_weight = None
        if release_plain:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            y = self.quantized.matmul(x)
            if self.bias is not None:
                y = y + self.bias
        elif self._gemv_applies(x, PROJECTION_GEMV_MAX_ROWS) and (gemv := kernels.compiled_op("bf16_linear")):
            y = gemv(x.contiguous(), self.weight)
        elif self.packed_weight is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            y = self.lora.add_delta(x, y)
        return y

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`self(x)` as fp32 into `out` (contiguous `[rows, out_features]`); returns `out`.

        A few bf16 rows against a plain weight (the table an lm_head shares with the embedding) take the compiled
        GEMV: it streams the weight once, where oneDNN is slow at so few rows, and writes fp32 with no copy. So do
        steps whose adapters leave this layer alone (most adapters never touch the lm_head).
        """
        no_delta = self.lora is None or not self.lora.adds_to_step()
        if no_delta and self._gemv_applies(x, GEMV_MAX_ROWS) and (op := kernels.compiled_op("bf16_linear_fp32_")):
            return op(out, x.contiguous(), self.weight)
        return out.copy_(self(x))

    def _gemv_applies(self, x: torch.Tensor, max_rows: int | None) -> bool:
        """The GEMV can compute `x W^T` here: a plain bf16 weight on the CPU, no bias, at most `max_rows` rows."""
        weight = self.weight
        return (weight is not None and self.bias is None and self.quantized is None and x.device.type == "cpu"
                and x.dtype == weight.dtype == torch.bfloat16 and weight.is_contiguous() and x.dim() == 2
                and _fits(x.shape[0], max_rows))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ProjectionGroup:
    """Projections of one input that are computed together, q/k/v or gate/up, where the compiled GEMV serves them:
    one call over their weights laid end to end (`fuse`), in place of a call and a pass over a small matrix each.
    Each layer keeps its own module, name and adapter delta; where the GEMV does not apply, each runs as itself.

    Not an `nn.Module`: the layers stay registered once, under the names checkpoints and PEFT give them.
    """

    def __init__(self, *linears: Linear) -> None:
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self.weight: torch.Tensor | None = None  # the layers' weights end to end, once fused
        self._views: tuple[torch.Tensor | None, ...] = ()  # each layer's weight as `fuse` left it

    def fuse(self) -> bool:
        """Lay the plain bf16 weights end to end in one tensor, each layer's weight becoming a view of its rows (no
        copy kept); False, and nothing changed, where a layer has no plain bf16 weight of its own or a bias."""
        weights = [linear.weight for linear in self.linears]
        if any(w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu" for w in weights) or any(
                linear.bias is not None or linear.quantized is not None for linear in self.linears):
            return False
        merged = torch.cat([w.detach() for w in weights])
        for linear, rows in zip(self.linears, merged.split(self.sizes)):
            linear.weight = nn.Parameter(rows, requires_grad=False)
        self.weight = merged
        self._views = tuple(linear.weight for linear in self.linears)
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output, its adapter delta included, as `[linear(x) for linear in linears]` returns."""
        merged = self.weight
        if (merged is not None and x.dtype == torch.bfloat16 and x.dim() == 2
                and _fits(x.shape[0], PROJECTION_GEMV_MAX_ROWS) and (op := kernels.compiled_op("bf16_linear_parts"))
                and all(linear.weight is view for linear, view in zip(self.linears, self._views))):
            outs = op(x.contiguous(), merged, self.sizes)
            return [out if linear.lora is None else linear.lora.add_delta(x, out)
                    for linear, out in zip(self.linears, outs)]
        return [linear(x) for linear in self.linears]


def fuse_projection_groups(model: nn.Module) -> int:
    """Fuse every `ProjectionGroup` the model's modules hold (see `ProjectionGroup.fuse`) where the GEMV is built;
    returns how many fused. Called once the weights are final (loaded, quantized, packed), since `fuse` rebinds
    them."""
    if not _fits(1, PROJECTION_GEMV_MAX_ROWS) or kernels.compiled_op("bf16_linear_parts") is None:
        return 0
    groups = [value for module in model.modules() for value in vars(module).values()
              if isinstance(value, ProjectionGroup)]
    return sum(group.fuse() for group in groups)


def cpu_packing_applies(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN's packed bf16 path: only bf16 weights on a CPU whose oneDNN build supports bf16."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that a module other than a `Linear` also holds (a tied embedding table)."""
    return {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every float `Linear` of `model` for the CPU; returns how many were packed.

    Where the compiled GEMV is built, each layer keeps its plain copy too: one decode row streams the plain weight
    through the GEMV faster than oneDNN reads its packed one, and batches keep the packed layout. Memory for speed:
    the decoder's weights are held twice (RESULTS.md, one stream, has both figures).
    """
    shared = _shared_parameters(model)
    keep_plain = kernels.compiled_op("bf16_linear") is not None
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.quantized is None]
    for linear in linears:
        linear.pack_for_cpu(release_plain=id(linear.weight) not in shared and not keep_plain)
    return len(linears)


def quantize_linear_weights(model: nn.Module, format_of: Callable[[str], str | None]) -> dict[str, int]:
    """Quantize each float `Linear` of `model` to `format_of(its name)` (None: keep it float); returns counts per
    format. Layers that arrived quantized (`set_quantized`) are left as they are."""
    shared = _shared_parameters(model)
    counts: dict[str, int] = {}
    for name, linear in model.named_modules():
        fmt = format_of(name) if isinstance(linear, Linear) and linear.quantized is None else None
        if fmt is not None:
            linear.quantize(fmt, release_plain=id(linear.weight) not in shared, name=name)
            counts[fmt] = counts.get(fmt, 0) + 1
    _share_tied_tables(model)
    return counts


def _share_tied_tables(model: nn.Module) -> None:
    """An embedding table tied to a quantized `Linear` whose format can serve rows (int8 w8a8) reads them from it,
    and the float table goes: the quantized model keeps one copy of it, in the narrow format."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight is not None]
    for embedding in (m for m in model.modules() if isinstance(m, VocabEmbedding) and m.weight is not None):
        for linear in linears:
            if linear.weight is embedding.weight and hasattr(linear.quantized, "lookup"):
                embedding.set_quantized(linear.quantized)  # type: ignore[arg-type]
                linear.register_parameter("weight", None)
