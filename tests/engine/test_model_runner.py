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


def test_a_steps_inputs_go_up_as_views_of_one_tensor() -> None:
    """layout_batch sends a step's token ids, positions, slots and block tables in one copy: each input is
    a view of it, with the values each chunk asks for (decodes first, NULL_BLOCK table entries as 0)."""
    from duoserve.engine.model_runner import SeqChunk, layout_batch

    chunks = [
        SeqChunk([11, 12, 13], 0, [4, 5]),  # a prefill chunk of 3 tokens
        SeqChunk([21], 5, [-1, 7]),  # a decode at position 5, its first block freed (a sliding window)
        SeqChunk([31], 0, [9]),
    ]
    layout = layout_batch(chunks, 4, torch.device("cpu"))
    meta = layout.meta
    assert layout.input_ids.tolist() == [21, 31, 11, 12, 13] and layout.positions.tolist() == [5, 0, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [7 * 4 + 1, 9 * 4, 16, 17, 18]
    assert meta.decode_block_tables.tolist() == [[0, 7], [9, 0]] and meta.decode_context_lens.tolist() == [
        6,
        1,
    ]
    assert meta.prefills[0].block_table.tolist() == [4, 5] and layout.query_starts == [2, 0, 1]
    base = layout.input_ids.untyped_storage().data_ptr()
    for tensor in (
        layout.positions,
        meta.slot_mapping,
        meta.decode_block_tables,
        meta.prefills[0].block_table,
    ):
        assert tensor.untyped_storage().data_ptr() == base
