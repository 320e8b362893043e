"""duoserve.models.moe against transformers' sparse MoE blocks (Qwen3-MoE, Mixtral) on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.models.moe import MoE

transformers = pytest.importorskip("transformers")


def _block(kind: str, norm_topk_prob: bool = False):
    common = dict(hidden_size=32, num_experts_per_tok=3, num_hidden_layers=1, num_attention_heads=2)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        block = MixtralSparseMoeBlock(
            transformers.MixtralConfig(**common, num_local_experts=6, intermediate_size=24)
        )
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = transformers.Qwen3MoeConfig(
            **common, num_experts=6, moe_intermediate_size=24, norm_topk_prob=norm_topk_prob
        )
        block = Qwen3MoeSparseMoeBlock(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_()
    return block.eval()


def _ours(block, renormalize: bool) -> MoE:
    return MoE(
        router=block.gate.weight.detach(),
        gate_up=block.experts.gate_up_proj.detach(),
        down=block.experts.down_proj.detach(),
        top_k=3,
        renormalize=renormalize,
        act=F.silu,
    )


@pytest.mark.parametrize("kind,renormalize", [("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", True)])
def test_matches_transformers(kind: str, renormalize: bool) -> None:
    block = _block(kind, norm_topk_prob=renormalize)
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x[None])[0]
        _, ref_weights, ref_experts = block.gate(x)
    ours = _ours(block, renormalize)
    weights, experts = ours.route(x)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)


def test_experts_without_tokens_and_a_single_row() -> None:
    """Decode steps route one row to top_k experts; the others receive nothing and are skipped."""
    block = _block("mixtral")
    ours = _ours(block, renormalize=True)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), block(x[None])[0], rtol=1e-5, atol=1e-5)
