"""Batched LoRA: the adapters of one step's batch applied together, one computation per linear.

Each LoRA-capable linear of the model (fused Q/K/V, o, fused gate/up, down) holds `max_loras` slots of
stacked weights: A [max_loras, parts * max_rank, in], a fused linear's parts (q, k, v) each owning
`max_rank` rows, and per part B [max_loras, max_rank, out_part]. An adapter of a smaller rank, or
without some part, leaves zeros: they add nothing. B is stored with its rank dimension first, so that
a step's slots are one contiguous [slots * rank, out_part] matrix for a single GEMM, and `scaling` is
folded into it at load. (One block-diagonal B for all parts would make the expand a single GEMM, but
reads and holds `parts` times the B weights: 1.5x the LoRA bytes of a decode step, which reads them all.)

A step's tokens carry the slot of their request's adapter (`LoRAMapping`, from the model runner); its
LoRA tokens are multiplied by the A of every slot in use in one GEMM (shrink), masked to their own
slot's rows, and by each part's B of every slot (expand), accumulated by the GEMM itself into that part's
columns of the base output (addmm_, no product, concatenation or add of its own): y[t] += B[s_t] A[s_t] x[t].
One shrink and one expand per part, per linear and step, whatever the number
of adapters and requests (punica's SGMV computes only each token's own slot; on CPU dense GEMMs over a
few slots are simpler, and a decode step's cost is reading each slot's weights once either way). A
batch of the base model only skips all of it.
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
        # A of every part stacked (one shrink GEMM); B per part, rank first (one expand GEMM each).
        self.a = torch.zeros(max_loras, len(part_sizes) * max_rank, in_features, dtype=dtype, device=device)
        self.b = [torch.zeros(max_loras, max_rank, size, dtype=dtype, device=device) for size in part_sizes]

    def set(self, slot: int, parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Write an adapter into `slot`: per part, (A [r, in], scaled B [out_part, r]) or None."""
        self.clear(slot)
        for index, weights in enumerate(parts):
            if weights is not None:
                a, b = weights
                row = index * self.max_rank
                self.a[slot, row : row + a.shape[0]] = a
                self.b[index][slot, : a.shape[0]] = b.t()

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        for b in self.b:
            b[slot].zero_()

    def apply(self, x: torch.Tensor, y: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
        """y plus the LoRA outputs of x's rows, each through its own slot's adapter."""
        n, rank, parts = mapping.num_slots, self.max_rank, len(self.b)
        xs = x if mapping.rows is None else x.index_select(0, mapping.rows)
        shrunk = torch.nn.functional.linear(xs, self.a[:n].view(n * parts * rank, -1))
        if n > 1:  # with one slot, every selected row is that slot's
            shrunk = (shrunk.view(-1, n, parts, rank) * mapping.mask[:, :, None, None]).transpose(1, 2)
            shrunk = shrunk.reshape(-1, parts * n * rank)  # [rows, part, slot, rank]: each part's columns
        # Every row of y, or a zeroed buffer of the selected rows added to theirs at the end.
        out = y if mapping.rows is None else y.new_zeros(len(mapping.rows), y.shape[1])
        column = 0
        for index, (b, size) in enumerate(zip(self.b, self.part_sizes, strict=True)):
            # In place, into the part's columns: no per-part product, concatenation or separate add.
            part = shrunk[:, index * n * rank : (index + 1) * n * rank]
            out[:, column : column + size].addmm_(part, b[:n].view(n * rank, size))
            column += size
        if mapping.rows is None:
            return y
        return y.index_add_(0, mapping.rows, out)


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
