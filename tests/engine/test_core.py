"""EngineCore's use of the host's defaults (duoserve/hardware.py) and of the config's overrides."""

from __future__ import annotations

from duoserve import LLM


def test_config_overrides_reach_the_model_and_the_startup_line(
    smollm2_gguf_path, single_torch_thread, caplog
):
    """--quantized-max-rows (else the host's threshold) is each quantized linear's, and the startup log
    line gives the host's choices and says which the config replaced."""
    caplog.set_level("INFO", logger="duoserve.engine.core")
    llm = LLM(
        dtype="bfloat16",
        device="cpu",
        attention_backend="torch",
        num_kv_blocks=4,
        block_size=16,
        num_threads=1,
        quantized_max_rows=3,
    )
    qkv = llm.engine.core.model.layers[0].qkv
    assert type(qkv).__name__ == "Int4Linear" and qkv.max_rows == 3
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("host: ")]
    assert " -> dtype " in line and "attention kernel " in line
    assert line.endswith("; set by the config: dtype bfloat16, num_threads 1, quantized_max_rows 3")
