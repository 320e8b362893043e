"""The engine's adapters: loaded by name, placed in the model's `max_loras` slots as steps need them."""

from __future__ import annotations

from duoserve.lora.adapter import TARGET_SITES, LoRAAdapter, load_adapter
from duoserve.lora.request import LoRARequest
from duoserve.models.config import ModelConfig
from duoserve.models.lora_layers import LoRASlots

# The projections of each LoRA-capable linear, in the order llama.py fuses their outputs.
SITE_TARGETS = {
    site: [target for target, s in TARGET_SITES.items() if s == site]
    for site in ("qkv", "o", "gate_up", "down")
}


class LoRAManager:
    """Adapters by name (loaded once, kept in host memory), and which one each slot holds.

    A request holds its adapter object, so an adapter unloaded while requests use it serves them to
    the end; only new requests no longer find it. A step's adapters get slots: the ones already
    resident keep theirs, the others take the lowest slot that no adapter of this step needs (so the
    slots in use stay packed at the front: `LoRAMapping.num_slots` is what the step computes).
    """

    def __init__(
        self, sites: list[dict[str, LoRASlots]], config: ModelConfig, max_loras: int, max_rank: int
    ) -> None:
        self.sites = sites  # per layer: site name -> its slots
        self.config = config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.adapters: dict[str, LoRAAdapter] = {}
        self.slots: list[LoRAAdapter | None] = [None] * max_loras

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """Load a new adapter (ValueError if the name is taken, or the adapter does not fit the model)."""
        if request.lora_name in self.adapters:
            raise ValueError(f"the LoRA adapter {request.lora_name!r} is already loaded")
        adapter = load_adapter(request, self.config, self.max_rank)
        self.adapters[request.lora_name] = adapter
        return adapter

    def resolve(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter a request names, loaded on first use (vLLM's offline LoRARequest behaviour)."""
        adapter = self.adapters.get(request.lora_name)
        if adapter is None:
            return self.load(request)
        if adapter.request.lora_path != request.lora_path:
            raise ValueError(
                f"the LoRA adapter {request.lora_name!r} is loaded from {adapter.request.lora_path!r}, "
                f"not {request.lora_path!r}"
            )
        return adapter

    def unload(self, name: str) -> bool:
        """Forget an adapter (requests using it run on); False if there is none of that name."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            return False
        for index, held in enumerate(self.slots):
            if held is adapter:
                self._clear(index)
        return True

    def assign(self, adapters: list[LoRAAdapter]) -> dict[int, int]:
        """Slots for a step's adapters (the scheduler admits at most max_loras): id(adapter) -> slot."""
        needed = list({id(a): a for a in adapters}.values())
        if len(needed) > self.max_loras:
            raise RuntimeError(f"{len(needed)} adapters in one step, more than max_loras={self.max_loras}")
        wanted = {id(a) for a in needed}
        placed = {id(held): i for i, held in enumerate(self.slots) if held is not None and id(held) in wanted}
        free = [i for i, held in enumerate(self.slots) if held is None or id(held) not in wanted]
        for adapter in needed:
            if id(adapter) not in placed:
                slot = free.pop(0)
                self._write(slot, adapter)
                placed[id(adapter)] = slot
        return placed

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for layer, sites in enumerate(self.sites):
            for site, slots in sites.items():
                slots.set(slot, [adapter.weights.get((layer, target)) for target in SITE_TARGETS[site]])
        self.slots[slot] = adapter

    def _clear(self, slot: int) -> None:
        for sites in self.sites:
            for slots in sites.values():
                slots.clear(slot)
        self.slots[slot] = None


def lora_manager_for(model, config: ModelConfig, max_loras: int, max_rank: int) -> LoRAManager:
    """Slots in every layer of `model` (a LlamaModel) and the manager that fills them."""
    return LoRAManager(model.add_lora_slots(max_loras, max_rank), config, max_loras, max_rank)
