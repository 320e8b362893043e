"""duoserve: LLM inference serving with a paged KV cache, continuous batching and disaggregation."""

from duoserve.llm import LLM
from duoserve.lora.request import LoRARequest
from duoserve.outputs import CompletionOutput, Logprob, RequestOutput
from duoserve.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "LoRARequest", "RequestOutput", "SamplingParams"]
