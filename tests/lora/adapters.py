"""Random PEFT LoRA adapters of the tiny test models, made and saved by `peft` itself."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_TARGETS = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def peft_adapter(base, directory: Path, targets: list[str], r: int, alpha: float, seed: int, **extra):
    """A LoRA adapter with random A and B (peft's init_lora_weights=False: nn.Linear's init for both,
    so B is not zero and the adapter changes the logits), saved as PEFT saves it. Returns the peft
    model (on a copy of `base`), whose forward is the reference."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **extra
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # wider B, so that each adapter moves greedy choices clearly
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(2.0)
    model.save_pretrained(directory)
    return model.eval()
