"""How the model runner runs a step: eagerly on CPU (no graphs, the path unchanged), and on CUDA by
replaying a decode graph per padded batch size, whose outputs must equal eager steps'."""

from __future__ import annotations

import pytest
import torch

from duoserve.engine.model_runner import graph_batch_sizes
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_graph_batch_sizes_cover_every_batch_up_to_the_limit() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(10) == [1, 2, 4, 8, 10]
    assert graph_batch_sizes(128) == [1, 2, 4, *range(8, 129, 8)]
    assert graph_batch_sizes(4096)[-1] == 512  # larger batches run eagerly


def test_cpu_engines_run_eagerly(tiny_models) -> None:
    _, path = tiny_models("llama_gqa")
    llm = LLM(model=path, device="cpu", dtype="float32", num_kv_blocks=16, attention_backend="torch")
    assert llm.engine.core.decode_graphs is None


def _greedy(path: str, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=path, device="cuda", dtype="float32", block_size=5, num_kv_blocks=64, **engine_args)
    prompts = [random_prompt(n, seed=n) for n in (3, 11, 17)]
    # Different lengths: the batch shrinks from 3 (padded to 4) to 2 and 1 as requests finish.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 9, 14)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm


@cuda
def test_decode_graphs_equal_eager_steps(tiny_models) -> None:
    _, path = tiny_models("llama_gqa")
    eager, llm = _greedy(path, enforce_eager=True)
    assert llm.engine.core.decode_graphs is None
    graphed, llm = _greedy(path)
    assert sorted(llm.engine.core.decode_graphs.graphs) == [1, 2, 4]
    assert graphed == eager


@cuda
def test_torch_backend_runs_eagerly_on_cuda(tiny_models) -> None:
    _, path = tiny_models("llama_gqa")
    outputs, llm = _greedy(path, attention_backend="torch")
    assert llm.engine.core.decode_graphs is None
    assert outputs == _greedy(path, enforce_eager=True)[0]
