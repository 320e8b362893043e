"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Served only when the operator allows it (`--allow-runtime-lora-updating`, or
DUOSERVE_ALLOW_RUNTIME_LORA_UPDATING=true as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): loading reads
files from the server's disk at a client's request. The answers are vLLM's: 200 with a plain-text
success line; 400 for an adapter that cannot be loaded (name taken, no such files, wrong rank or
shapes), 404 for unloading one that is not there.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import Field

from duoserve.server.engine_client import EngineClient
from duoserve.server.protocol import _Strict, parse_body


class LoadLoRAAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)

    def check_supported(self) -> None:
        pass


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's field; the name decides

    def check_supported(self) -> None:
        pass


class LoRARoutes:
    def __init__(self, client: EngineClient, read_body) -> None:
        """`read_body`: the server's body reader (size and time limits, content type)."""
        self.client = client
        self.read_body = read_body

    async def load(self, request: Request) -> PlainTextResponse:
        body: LoadLoRAAdapterRequest = parse_body(await self.read_body(request), LoadLoRAAdapterRequest)
        await self.client.load_lora(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, request: Request) -> PlainTextResponse:
        body: UnloadLoRAAdapterRequest = parse_body(await self.read_body(request), UnloadLoRAAdapterRequest)
        await self.client.unload_lora(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def model_cards(client: EngineClient, base: dict[str, Any]) -> list[dict[str, Any]]:
    """/v1/models' cards of the adapters, as vLLM lists them: `parent` is the base model, `root` the path."""
    return [
        {**base, "id": name, "root": lora.lora_path, "parent": base["id"], "max_model_len": None}
        for name, lora in sorted(client.lora_adapters().items())
    ]
