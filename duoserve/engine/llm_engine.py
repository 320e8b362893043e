"""LLMEngine: tokenizer + output processing in front of an in-process engine core."""

from __future__ import annotations

import dataclasses
import logging

from duoserve.config import EngineConfig
from duoserve.engine.core import EngineCore
from duoserve.engine.output_processor import OutputProcessor
from duoserve.engine.step_observer import MakeStepObserver
from duoserve.lora.request import LoRARequest
from duoserve.models.loader import load_model
from duoserve.outputs import RequestOutput
from duoserve.sampling_params import SamplingParams
from duoserve.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def child_params(params: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams per sequence of an n > 1 request; seeded ones get seed + index (vLLM)."""
    if params.n == 1:
        return [params]
    return [
        dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
        for i in range(params.n)
    ]


class LLMEngine:
    def __init__(self, config: EngineConfig, make_step_observer: MakeStepObserver | None = None) -> None:
        """`make_step_observer`: the core's step observer (--step-trace), built by the caller."""
        self.config = config
        loaded = load_model(config.model, config.resolved_dtype())
        self.tokenizer = load_tokenizer(loaded.source, loaded.gguf_reader)
        self.core = EngineCore(config, loaded, make_step_observer=make_step_observer)
        self.processor = OutputProcessor(self.tokenizer)
        self.eos_token_ids = list(dict.fromkeys(self.tokenizer.eos_token_ids + loaded.config.eos_token_ids))
        self.model_name = loaded.source

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a prompt (text, or token ids), on the base model or a LoRA adapter. Raises ValueError for
        a prompt, params or adapter it cannot serve."""
        if request_id in self.processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        sequences = child_params(params)
        seq_ids = self.processor.add(request_id, text, token_ids, sequences)
        try:
            for seq_id, seq_params in zip(seq_ids, sequences, strict=True):
                self.core.add_request(
                    seq_id, token_ids, seq_params, self.eos_token_ids, lora_request=lora_request
                )
        except ValueError:
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        for seq_id in self.processor.remove(request_id):
            self.core.abort(seq_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One engine step; the requests it updated (`final_only`: those it finished)."""
        outputs, stopped = self.processor.process(self.core.step(), final_only)
        for seq_id in stopped:
            self.core.abort(seq_id)
        return outputs
