"""Batched LoRA: the adapters of one step's batch applied together, one computation per linear.

Each LoRA-capable linear of the model (fused Q/K/V, o, fused gate/up, down) holds `max_loras` slots of
stacked weights: A [max_loras, parts * max_rank, in] and B [max_loras, parts * max_rank, out], where a
fused linear's parts (q, k, v) each own `max_rank` rows of A and the matching rows of B, which are zero
outside that part's output columns (a block-diagonal B: one expand covers all parts). An adapter of a
smaller rank, or without some part, leaves zeros: they add nothing. B is stored with its rank dimension
first, so that a step's slots are one contiguous [slots * rank, out] matrix for a single GEMM, and
`scaling` is folded into it at load.

A step's tokens carry the slot of their request's adapter (`LoRAMapping`, from the model runner); its
LoRA tokens are multiplied by the A of every slot in use in one GEMM (shrink), masked to their own
slot's rows, and by the B of every slot in one more (expand), added to the base output in place:
y[t] += B[s_t] A[s_t] x[t]. Two GEMMs per linear per step whatever the number of adapters and requests
(punica's SGMV computes only each token's own slot; on CPU two dense GEMMs over a few slots are
simpler and the extra work is `slots * rank` columns, small beside the base projection). A batch of the
base model only skips all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRAMapping:
    """Which adapter slot each LoRA token of a step uses."""

    rows: torch.Tensor | None  # rows of the step's tokens that have an adapter (None: every row)
    mask: torch.Tensor  # [len(rows), num_slots] one-hot of each such row's slot, in the model's dtype
    num_slots: int  # slots 0..num_slots-1 are computed (the highest one in use, plus one)

    @classmethod
    def of(cls, token_slots: list[int], dtype: torch.dtype, device: torch.device) -> LoRAMapping | None:
        """From each token's slot (-1: the base model); None when no token has an adapter."""
        slots = torch.tensor(token_slots, dtype=torch.long)
        rows = torch.nonzero(slots >= 0).flatten()
        if len(rows) == 0:
            return None
        used = slots[rows]
        num_slots = int(used.max()) + 1
        mask = torch.nn.functional.one_hot(used, num_slots).to(device=device, dtype=dtype)
        all_rows = len(rows) == len(slots)
        return cls(None if all_rows else rows.to(device), mask, num_slots)


class LoRAState:
    """The mapping of the step being computed, shared by the model's LoRA linears (set by the model's
    forward for its duration: the linears are called with activations only)."""

    def __init__(self) -> None:
        self.mapping: LoRAMapping | None = None


class LoRASlots:
    """The stacked adapter weights of one (possibly fused) linear, for `max_loras` slots."""

    def __init__(
        self,
        in_features: int,
        part_sizes: list[int],
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.part_sizes = part_sizes
        self.max_rank = max_rank
        out = sum(part_sizes)
        width = len(part_sizes) * max_rank
        self.a = torch.zeros(max_loras, width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, width, out, dtype=dtype, device=device)

    def set(self, slot: int, parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Write an adapter into `slot`: per part, (A [r, in], scaled B [out_part, r]) or None."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        column = 0
        for index, (size, weights) in enumerate(zip(self.part_sizes, parts, strict=True)):
            if weights is not None:
                a, b = weights
                row = index * self.max_rank
                self.a[slot, row : row + a.shape[0]] = a
                self.b[slot, row : row + a.shape[0], column : column + size] = b.t()
            column += size

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def apply(self, x: torch.Tensor, y: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
        """y plus the LoRA outputs of x's rows, each through its own slot's adapter."""
        n = mapping.num_slots
        width = self.a.shape[1]
        xs = x if mapping.rows is None else x.index_select(0, mapping.rows)
        shrunk = torch.nn.functional.linear(xs, self.a[:n].view(n * width, -1))  # [rows, n * width]
        shrunk = (shrunk.view(-1, n, width) * mapping.mask[:, :, None]).view(-1, n * width)
        delta = shrunk @ self.b[:n].view(n * width, -1)
        if mapping.rows is None:
            return y.add_(delta)
        return y.index_add_(0, mapping.rows, delta)


class LoRALinear:
    """A base linear (dense or quantized) plus the LoRA slots of the step's adapters."""

    def __init__(self, base, slots: LoRASlots, state: LoRAState) -> None:
        self.base = base
        self.slots = slots
        self.state = state

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mapping = self.state.mapping
        if mapping is None:
            return y
        return self.slots.apply(x, y, mapping)
