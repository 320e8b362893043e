"""LLM: the offline API, as vLLM users know it (`LLM(model).generate(prompts, params)`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.lora.request import LoRARequest
from duoserve.outputs import RequestOutput
from duoserve.plan.trace import step_trace_observer
from duoserve.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


# The offline API's token budget per step, as vLLM's CPU backend sets for its LLM class: a batch job wants
# throughput, and bigger prefill chunks run the GEMMs more efficiently (issue 2's benchmark, 256 SmolLM2
# requests on 2 cores: 471 output tok/s at 512, 624 at 4096; BENCHMARKS.md). A server keeps EngineConfig's
# 512, which bounds how long a prefill chunk stalls everyone's next token.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 4096


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        engine_args.setdefault("max_num_batched_tokens", OFFLINE_MAX_NUM_BATCHED_TOKENS)
        config = EngineConfig(model=model, **engine_args)
        self.engine = LLMEngine(config, step_trace_observer(config.step_trace))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Shut the engine down gracefully: with --kv-offload-dir, the prefixes its KV cache still holds
        are written to disk first, so the next LLM over the same directory starts warm. Also on leaving
        `with LLM(...) as llm:`."""
        self.engine.core.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt: a string, a list of token ids, or {"prompt": ...} /
        {"prompt_token_ids": [...]}. `lora_request`: the LoRA adapter of every prompt, or one per prompt
        (None: the base model), as vLLM's. Returns the outputs in the prompts' order."""
        prompt_list = _as_prompt_list(prompts)
        params = _params_per_prompt(sampling_params, len(prompt_list))
        loras = _loras_per_prompt(lora_request, len(prompt_list))
        return self._run(
            [(_prompt_of(p), sp) for p, sp in zip(prompt_list, params, strict=True)], use_tqdm, loras
        )

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations (one list of {"role", "content"} messages, or several);
        `tools` (OpenAI's format) go to the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            # The template already wrote any special tokens the model expects.
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        params = _params_per_prompt(sampling_params, len(prompts))
        loras = _loras_per_prompt(lora_request, len(prompts))
        return self._run(list(zip(prompts, params, strict=True)), use_tqdm, loras)

    def _run(
        self,
        requests: list[tuple[str | list[int], SamplingParams]],
        use_tqdm: bool,
        loras: list[LoRARequest | None],
    ) -> list[RequestOutput]:
        ids = []
        try:
            for (prompt, params), lora in zip(requests, loras, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, params, lora)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2) as bar:
            while len(finished) < len(ids):
                for output in self.engine.step(final_only=True):
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _prompt_of(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _params_per_prompt(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return params


def _loras_per_prompt(
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None, count: int
) -> list[LoRARequest | None]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * count
    loras = list(lora_request)
    if len(loras) != count:
        raise ValueError(f"got {len(loras)} lora_requests for {count} prompts")
    for lora in loras:
        if lora is not None and not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest or None, got {type(lora).__name__}")
    return loras
