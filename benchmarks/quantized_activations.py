"""What the activations of the 4/8-bit codes' kernels cost: int8 against int16 rounding in float32
models (accuracy and kernel time), and, with --formats, float32 against bfloat16 activations.

    python benchmarks/quantized_activations.py [--tokens 256] [--repeats 200]
    python benchmarks/quantized_activations.py --formats [--rows 1 4 8 16 64 512]

Default: duoserve's float32 kernels (models/cpu_quant_linear.py) round each group of 32 activations to
int16 (1 row) or int8 (`--quantized-activations int8`, llama.cpp's q8 blocks). On the default model
(SmolLM2-135M-Instruct Q4_1 GGUF), against dense float32 (the file's weights dequantized exactly):

- teacher-forced over a fixed text, every position decoded as a 1-row step (as in serving): KL
  divergence of the next-token distributions (mean, p99, max), the top-1 agreement, and the largest
  relative error of a position's logits (L2, as the tests' rel_err);
- greedy decoding of --tokens tokens from the text's first 32: tokens identical to the reference's, and
  the first position that differs.

hardware.py's gate (passes_int8_gate) is checked on these figures. Then the kernels alone, µs per call
at 1 row (p10 of --repeats calls after a warm-up: the least noisy figure on a busy machine), 1 and 2
threads, for the model's shapes with random Q4 and Q8 codes; and all the matmuls of one 1-row forward of
the model.

--formats: torch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` accept float32 activations too;
that table says what they cost there, which decides whether an AVX2-only CPU (float32 by default,
duoserve/hardware.py) should run its decode steps on the codes with torch's kernels (they ran 10-20x
slower than with bfloat16 ones, so: no). One pass per cell after a warm-up, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionMetadata
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.hardware import INT8_GATE, passes_int8_gate
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.models.linear import DenseLinear, make_linear
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel, load_model
from duoserve.tokenizer import load_tokenizer

TEXT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz named "
    "Johannes Gutenberg combined movable metal type, an oil-based ink and a wooden screw press into a "
    "system that could produce books faster than any scribe. Before him, texts were copied by hand or cut "
    "into wooden blocks, and a single Bible could take a monastery years. Within fifty years of his first "
    "printed Bible, presses were running in more than two hundred cities across Europe, and millions of "
    "volumes had been printed. The consequences reached far beyond books. Scientists could share exact "
    "copies of their tables and diagrams; reformers spread pamphlets faster than authorities could ban "
    "them; merchants printed standard forms and price lists. Literacy rose as reading material became "
    "cheaper, and vernacular languages gained fixed spellings as printers chose one form among many.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "Question: what is the capital of France, and which river runs through it? Answer: Paris, on the "
    "Seine. Question: how many legs does a spider have? Answer: eight. Question: name three primary "
    "colors. Answer: red, yellow and blue. In 1969 the Apollo 11 mission landed two astronauts on the Moon; "
    "they spent about two and a half hours outside the lunar module before returning to Earth safely."
)
PROMPT_TOKENS = 32  # the greedy runs' prompt: the text's first tokens


# ---- accuracy ----------------------------------------------------------------------------------------


class Decoder:
    """One sequence decoded one token per step (a 1-row step, as in serving), full logits each step."""

    def __init__(self, model: LlamaModel, max_tokens: int, block_size: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        blocks = -(-max_tokens // block_size)
        spec = KVCacheSpec.for_model(model.config, block_size, model.dtype)
        self.kv_cache = KVCache(spec, blocks, torch.device("cpu"))
        self.table = torch.arange(blocks)[None]

    def step(self, token: int, position: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([position]),
            num_decode_tokens=1,
            decode_block_tables=self.table,
            decode_context_lens=torch.tensor([position + 1]),
            prefills=[],
            block_size=self.block_size,
        )
        hidden = self.model.forward(torch.tensor([token]), torch.tensor([position]), self.kv_cache, meta)
        return self.model.compute_logits(hidden)[0]

    def teacher_forced(self, tokens: list[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab]: row i predicts token i + 1."""
        return torch.stack([self.step(token, i) for i, token in enumerate(tokens)])

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        for i, token in enumerate(prompt[:-1]):
            self.step(token, i)
        out, token = [], prompt[-1]
        for position in range(len(prompt) - 1, len(prompt) - 1 + count):
            token = int(self.step(token, position).argmax())
            out.append(token)
        return out


def build(loaded: LoadedModel, activations: str | None, max_tokens: int) -> LlamaModel:
    """Dense float32 (None), or the file's codes with `activations`-rounded rows of x."""
    return LlamaModel(
        loaded.config,
        loaded.weights,
        TorchAttentionBackend(),
        torch.device("cpu"),
        torch.float32,
        max_positions=max_tokens,
        quantized=None if activations is None else loaded.quantized,
        quantized_max_rows=32,
        quantized_activations=activations or "int16",
    )


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """KL(reference || logits) per position, top-1 agreement, and the largest relative logit error."""
    ref_logp, logp = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    kld = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    rel = (logits.double() - reference.double()).norm(dim=-1) / reference.double().norm(dim=-1)
    return {
        "mean_kld": kld.mean().item(),
        "p99_kld": torch.quantile(kld, 0.99).item(),
        "max_kld": kld.max().item(),
        "top1": (logits.argmax(-1) == reference.argmax(-1)).double().mean().item(),
        "max_rel": rel.max().item(),
    }


def accuracy(loaded: LoadedModel, tokens: list[int], greedy_tokens: int) -> None:
    max_tokens = max(len(tokens), PROMPT_TOKENS + greedy_tokens) + 1
    variants = {"dense float32": None, "int16": "int16", "int8": "int8"}
    logits, greedy = {}, {}
    for name, activations in variants.items():
        model = build(loaded, activations, max_tokens)
        start = time.perf_counter()
        logits[name] = Decoder(model, max_tokens).teacher_forced(tokens)
        greedy[name] = Decoder(model, max_tokens).greedy(tokens[:PROMPT_TOKENS], greedy_tokens)
        print(
            f"{name}: {len(tokens) + PROMPT_TOKENS + greedy_tokens} decode steps in "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
    print(f"\nteacher-forced over {len(tokens)} tokens; greedy {greedy_tokens} tokens after {PROMPT_TOKENS}")
    print(
        "| activations | against | mean KLD | p99 KLD | max KLD | top-1 agree | max rel. logit err "
        "| greedy identical | first difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    pairs = [("int16", "dense float32"), ("int8", "dense float32"), ("int8", "int16")]
    results, identical = {}, {}
    for name, against in pairs:
        r = compare(logits[name], logits[against])
        results[name, against] = r
        same = [a == b for a, b in zip(greedy[name], greedy[against], strict=True)]
        identical[name, against] = all(same)
        first = same.index(False) if False in same else "none"
        print(
            f"| {name} | {against} | {r['mean_kld']:.2e} | {r['p99_kld']:.2e} | {r['max_kld']:.2e} "
            f"| {r['top1']:.4f} | {r['max_rel']:.2e} | {sum(same)}/{len(same)} | {first} |"
        )
    r = results["int8", "dense float32"]
    passed = passes_int8_gate(r["mean_kld"], r["p99_kld"], r["top1"], identical["int8", "dense float32"])
    verdict = "passes" if passed else "FAILS"
    print(f"\nINT8_GATE {INT8_GATE}, greedy tokens identical: int8 against dense float32 {verdict}")


# ---- kernel time ---------------------------------------------------------------------------------------

# (out_features, in_features) of SmolLM2-135M's matmuls: q/o_proj, gate or up_proj, down_proj, lm_head.
SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576))


def random_codes(fmt: str, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel operands of a random [n, k] weight: Q4 (codes, scale_min) or Q8 (codes, scales)."""
    if fmt == "q4":
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
        scales = (torch.rand(n, 2, k // 32, generator=generator) * 0.02 - 0.01).half()
    else:
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        scales = (torch.rand(n, k // 32, generator=generator) * 0.01).half()
    return codes, scales


def p10_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.quantiles(times, n=10)[0] * 1e6


def kernel_times(repeats: int, threads: list[int], rows: int) -> None:
    if not cpu_kernels_available():
        raise SystemExit("duoserve's CPU kernels did not build: nothing to time")
    generator = torch.Generator().manual_seed(0)
    print(f"\nkernel µs per call at {rows} row(s), p10 of {repeats} (weights hot in cache: the arithmetic)")
    print("| format | out x in | threads | int16 µs | int8 µs | int16 / int8 |")
    print("|---|---|---|---|---|---|")
    for fmt in ("q4", "q8"):
        op = torch.ops.duoserve_cpu.q4_matmul if fmt == "q4" else torch.ops.duoserve_cpu.q8_matmul
        for n, k in SHAPES:
            codes, scales = random_codes(fmt, n, k, generator)
            x = torch.randn(rows, k, generator=generator)
            for count in threads:
                torch.set_num_threads(count)
                t16 = p10_us(lambda: op(x, codes, scales, 16), repeats)  # noqa: B023
                t8 = p10_us(lambda: op(x, codes, scales, 8), repeats)  # noqa: B023
                print(f"| {fmt.upper()} | {n} x {k} | {count} | {t16:.1f} | {t8:.1f} | {t16 / t8:.2f} |")


def forward_matmuls(loaded: LoadedModel, repeats: int, threads: list[int]) -> None:
    """All the matmuls of one 1-row forward (the weights, ~100 MB, come from memory as in decode)."""
    print(f"\nall matmuls of one 1-row forward (lm_head + 30 layers), ms, p10 of {repeats}")
    print("| threads | int16 ms | int8 ms | int16 / int8 |")
    print("|---|---|---|---|")
    models = {a: build(loaded, a, 16) for a in ("int16", "int8")}
    for count in threads:
        torch.set_num_threads(count)
        cells = {}
        for activations, model in models.items():
            linears = [model.lm_head] + [lin for layer in model.layers for lin in layer.linears()]
            inputs = {lin.in_features: torch.randn(1, lin.in_features) for lin in linears}

            def once(linears=linears, inputs=inputs) -> None:
                for linear in linears:
                    linear(inputs[linear.in_features])

            cells[activations] = p10_us(once, repeats) / 1e3
        ratio = cells["int16"] / cells["int8"]
        print(f"| {count} | {cells['int16']:.2f} | {cells['int8']:.2f} | {ratio:.2f} |")


# ---- --formats: torch's 4/8-bit kernels with float32 against bfloat16 activations ----------------------

_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_NAMES += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_unfused(loaded, dtype: torch.dtype, codes: bool) -> list[DenseLinear]:
    """One linear per weight matrix (unfused), the codes' kernels run at every row count where `codes`."""
    names = ["model.embed_tokens.weight" if loaded.config.tie_word_embeddings else "lm_head.weight"]
    for i in range(loaded.config.num_hidden_layers):
        names += [f"model.layers.{i}.{n}.weight" for n in _NAMES]
    cpu = torch.device("cpu")
    return [
        make_linear([loaded.weights[n]], None, dtype, cpu, quantized=codes, max_rows=1 << 30) for n in names
    ]


def pass_ms(linears: list[DenseLinear], rows: int, dtype: torch.dtype, repeats: int) -> float:
    inputs = {w: torch.randn(rows, w).to(dtype) for w in {lin.in_features for lin in linears}}

    def once() -> None:
        for linear in linears:
            linear(inputs[linear.in_features])

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats * 1e3


def formats(loaded: LoadedModel, rows_list: list[int], repeats: int, fp32_code_rows: int) -> None:
    variants = {
        "float32 dense": (torch.float32, False),
        "bfloat16 dense": (torch.bfloat16, False),
        "codes, float32 activations": (torch.float32, True),
        "codes, bfloat16 activations": (torch.bfloat16, True),
    }
    models = {name: (dtype, build_unfused(loaded, dtype, codes)) for name, (dtype, codes) in variants.items()}
    print("| rows | " + " | ".join(f"{name} ms" for name in models) + " |")
    print("|---" * (len(models) + 1) + "|")
    for rows in rows_list:
        cells = []
        for name, (dtype, linears) in models.items():
            if name == "codes, float32 activations" and rows > fp32_code_rows:
                cells.append("-")
                continue
            cells.append(f"{pass_ms(linears, rows, dtype, repeats if rows <= 64 else 1):.1f}")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256, help="teacher-forced and greedy tokens")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per kernel")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--formats", action="store_true", help="torch's kernels, float32 vs bfloat16 x")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64, 512], help="--formats")
    parser.add_argument("--fp32-code-rows", type=int, default=8, help="--formats: fp32 codes up to this")
    args = parser.parse_args()
    loaded = load_model(None, torch.float32)
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {isa}")
    if args.formats:
        formats(loaded, args.rows, 3, args.fp32_code_rows)
        return
    if not args.skip_accuracy:
        tokenizer = load_tokenizer(loaded.source, loaded.gguf_reader)
        tokens = tokenizer.encode(TEXT)
        if len(tokens) < args.tokens:
            tokens = tokens * (args.tokens // len(tokens) + 1)
        accuracy(loaded, tokens[: args.tokens], args.tokens)
    if not args.skip_timing:
        kernel_times(args.repeats, args.threads, rows=1)
        forward_matmuls(loaded, max(10, args.repeats // 10), args.threads)


if __name__ == "__main__":
    main()
