"""Batched LoRA over dense and GGUF-quantized linears: each token through its own slot's adapter."""

from __future__ import annotations

import pytest
import torch

from duoserve.models.gguf_quants import GGUFTensor, random_blocks
from duoserve.models.linear import DenseLinear, make_linear, quantized_kernels_available
from duoserve.models.lora_layers import LoRALinear, LoRAMapping, LoRASlots, LoRAState
from tests.helpers import rel_err

CPU = torch.device("cpu")
IN, PARTS = 64, [64, 32, 32]  # a fused q/k/v of 64 query and 2 x 32 key/value features


def _adapters(generator: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """Two adapters: ranks 4 and 2, the second without the middle part (k)."""

    def part(rank: int, out: int):
        return torch.randn(rank, IN, generator=generator), torch.randn(out, rank, generator=generator)

    return [[part(4, p) for p in PARTS], [part(2, PARTS[0]), None, part(2, PARTS[2])]]


def _reference(x: torch.Tensor, base: torch.Tensor, adapters, token_slots: list[int]) -> torch.Tensor:
    """float32, one token at a time: base output plus the token's adapter's B A x, part by part."""
    rows = []
    for row, slot in zip(x.float(), token_slots, strict=True):
        out = base[len(rows)].clone()
        if slot >= 0:
            column = 0
            for size, weights in zip(PARTS, adapters[slot], strict=True):
                if weights is not None:
                    a, b = weights
                    out[column : column + size] += b @ (a @ row)
                column += size
        rows.append(out)
    return torch.stack(rows)


def _lora_linear(base, dtype: torch.dtype, adapters) -> tuple[LoRALinear, LoRAState]:
    state = LoRAState()
    slots = LoRASlots(IN, PARTS, max_loras=3, max_rank=4, dtype=dtype, device=CPU)
    for index, parts in enumerate(adapters):
        slots.set(index, parts)
    return LoRALinear(base, slots, state), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized", [False, True])
def test_each_token_gets_its_own_adapter_added_to_the_base_output(dtype, quantized):
    if quantized and not quantized_kernels_available(CPU, dtype):
        pytest.skip("no quantized kernels for this dtype here")
    generator = torch.Generator().manual_seed(0)
    if quantized:
        weight = GGUFTensor(random_blocks("Q4_0", sum(PARTS), IN, generator), "Q4_0", IN)
        base = make_linear([weight], None, dtype, CPU, quantized=True)
        assert not isinstance(base, DenseLinear)
    else:
        base = DenseLinear(torch.randn(sum(PARTS), IN, generator=generator).to(dtype))
    adapters = _adapters(generator)
    linear, state = _lora_linear(base, dtype, adapters)
    # Few rows (the quantized kernels' path) and many (dequantized tiles); base tokens among LoRA ones.
    for token_slots in ([0, -1, 1, 0], [1] * 3, [-1, 1, -1, 0, 0, 1, -1, 0] * 6):
        x = torch.randn(len(token_slots), IN, generator=generator).to(dtype)
        base_out = base(x).float()
        state.mapping = LoRAMapping.of(token_slots, dtype, CPU)
        out = linear(x)
        state.mapping = None
        assert out.dtype == dtype
        expected = _reference(x, base_out, adapters, token_slots)
        assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 2e-2), token_slots


def test_a_batch_without_adapters_runs_the_base_linear_alone():
    generator = torch.Generator().manual_seed(1)
    base = DenseLinear(torch.randn(sum(PARTS), IN, generator=generator))
    linear, state = _lora_linear(base, torch.float32, _adapters(generator))
    x = torch.randn(5, IN, generator=generator)
    assert LoRAMapping.of([-1] * 5, torch.float32, CPU) is None
    assert torch.equal(linear(x), base(x))


def test_mapping_computes_only_the_slots_up_to_the_highest_in_use():
    mapping = LoRAMapping.of([1, -1, 1], torch.float32, CPU)
    assert mapping.num_slots == 2 and mapping.rows.tolist() == [0, 2]
    assert mapping.mask.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    every = LoRAMapping.of([0, 0], torch.float32, CPU)
    assert every.rows is None and every.num_slots == 1
