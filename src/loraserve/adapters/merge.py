"""Per-request adapter merging (LoRAX's `merged_adapters`): linear, TIES, DARE-linear and DARE-TIES.

The merge follows PEFT's `add_weighted_adapter`, so a merged adapter equals the one PEFT builds: A and B are merged
separately, as task tensors, with weights `sqrt(|w s|)` (A also takes the sign of `w s`), where s is each adapter's
LoRA scale; the result has scale 1. Unlike PEFT and LoRAX, adapters of different ranks merge too: each task tensor is
pruned at its own size, then zero-padded to the largest rank (A's rows, B's columns). Padding adds no term to a sum
and casts no vote in TIES' sign election, so for equal ranks the result is exactly PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraserve.adapters.peft import LoRAAdapter, LoRAModule
from loraserve.errors import InvalidRequest

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_MERGED_ADAPTERS = 32  # each part is fetched and held for the merge
# Merge weights scale each adapter's delta by |w| (sqrt(|w|) on A and on B); PEFT's and LoRAX's examples stay within
# a few units. Beyond 100 a merge only blows the activations up (toward inf in half precision), so it is refused.
MAX_MERGE_WEIGHT = 100.0


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MergeSpec:
    adapter_ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0  # share of each task tensor kept by TIES / DARE pruning
    majority_sign_method: str = "total"

    def validate(self, *, max_adapters: int = MAX_MERGED_ADAPTERS) -> None:
        if not self.adapter_ids:
            raise InvalidRequest("merged_adapters.ids must name at least one adapter")
        if len(self.adapter_ids) > max_adapters:
            raise InvalidRequest(f"merged_adapters.ids names {len(self.adapter_ids)} adapters; at most "
                                 f"{max_adapters} are merged in one request")
        if not all(isinstance(i, str) and i for i in self.adapter_ids):
            raise InvalidRequest("merged_adapters.ids must be non-empty strings")
        if len(self.weights) != len(self.adapter_ids):
            raise InvalidRequest(f"merged_adapters has {len(self.adapter_ids)} ids but {len(self.weights)} weights")
        for weight in self.weights:
            if not _is_real(weight) or not math.isfinite(weight) or abs(weight) > MAX_MERGE_WEIGHT:
                raise InvalidRequest(
                    f"merged_adapters.weights must be finite numbers with |w| <= {MAX_MERGE_WEIGHT:g} (a weight "
                    f"scales its adapter's delta; larger ones only blow the activations up), not {weight!r}")
        if self.strategy not in STRATEGIES:
            raise InvalidRequest(f"merge_strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if not _is_real(self.density) or not 0.0 < self.density <= 1.0:  # NaN fails the comparison too
            raise InvalidRequest(f"merged_adapters.density must be a number in (0, 1], not {self.density!r}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise InvalidRequest(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, "
                                 f"not {self.majority_sign_method!r}")

    @property
    def key(self) -> str:
        """A stable name for the merged adapter: two requests with the same spec share one merge."""
        parts = ",".join(f"{i}*{w:g}" for i, w in zip(self.adapter_ids, self.weights))
        return f"merge[{self.strategy};d={self.density:g};{self.majority_sign_method}]({parts})"


def merge_adapters(adapters: list[LoRAAdapter], spec: MergeSpec, generator: torch.Generator | None = None
                   ) -> LoRAAdapter:
    """One adapter from `adapters` (in `spec.adapter_ids` order); DARE draws its masks from `generator`."""
    strategy = "linear" if len(adapters) == 1 else spec.strategy  # as PEFT: one adapter is a weighted copy
    modules = {}
    for name in sorted({name for adapter in adapters for name in adapter.modules}):
        parts = [(a.modules[name], w) for a, w in zip(adapters, spec.weights) if name in a.modules]
        rank = max(module.rank for module, _ in parts)
        scaled = [w * module.scale for module, w in parts]
        weights_a = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
        weights_b = torch.tensor([math.sqrt(abs(s)) for s in scaled])
        # PEFT's task tensors are the raw A and B: our B carries its scale, so it is divided back out. A scale of 0
        # (lora_alpha 0) kept no B to recover; its weight is 0, so it adds nothing (and casts no TIES vote).
        a = _merge([m.a.float() for m, _ in parts], weights_a, rank, 0, strategy, spec, generator)
        b = _merge([m.b.float() / m.scale if m.scale else torch.zeros_like(m.b, dtype=torch.float32)
                    for m, _ in parts], weights_b, rank, 1, strategy, spec, generator)
        dtype = parts[0][0].a.dtype
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        for label, tensor in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidRequest(f"merging {spec.key}: the merged {label} of {name} holds inf/nan (the weights "
                                     f"are too large for these adapters in {str(dtype).removeprefix('torch.')})")
        modules[name] = LoRAModule(a, b, scale=1.0)
    return LoRAAdapter(spec.key, modules)


def _merge(tensors: list[torch.Tensor], weights: torch.Tensor, rank: int, rank_dim: int, strategy: str,
           spec: MergeSpec, generator: torch.Generator | None) -> torch.Tensor:
    if strategy == "ties":
        tensors = [_magnitude_prune(t, spec.density) for t in tensors]
    elif strategy.startswith("dare"):
        tensors = [_random_prune(t, spec.density, generator) for t in tensors]
    stacked = torch.stack([_pad_rank(t, rank, rank_dim) for t in tensors])
    weighted = stacked * weights.view(-1, 1, 1)
    if strategy in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    # TIES' sign election on the pruned, unweighted tensors, then the mean over the entries that agree with it
    votes = stacked.sum(dim=0) if spec.majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agrees = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _pad_rank(tensor: torch.Tensor, rank: int, rank_dim: int) -> torch.Tensor:
    missing = rank - tensor.shape[rank_dim]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, missing) if rank_dim == 1 else (0, 0, 0, missing))


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries largest in magnitude."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[tensor.abs().flatten().topk(keep).indices] = 1
    return tensor * mask.view_as(tensor)


def _random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop entries at random with probability 1 - density and rescale the rest by 1 / density."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density
