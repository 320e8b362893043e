"""`duoserve generate | chat | serve | bench | plan | env | kv-scales`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from duoserve.bench import add_bench_parser, run_bench
from duoserve.config import add_engine_args, engine_config_from_args
from duoserve.disagg.endpoints import add_kv_endpoint_args, kv_endpoints_from_args
from duoserve.plan.cli import add_plan_parser
from duoserve.router.launcher import add_router_parsers
from duoserve.server.settings import add_server_args


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace):
    from duoserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _build_engine(args: argparse.Namespace):
    from duoserve.engine.llm_engine import LLMEngine
    from duoserve.plan.trace import step_trace_observer

    config = engine_config_from_args(args)
    return LLMEngine(config, step_trace_observer(config.step_trace))


def _stream(engine, request_id: str, prompt: str | list[int], params) -> str:
    """Run one request, printing its text as it is generated; returns the whole text."""
    engine.add_request(request_id, prompt, params)
    printed = 0
    text = ""
    while engine.has_unfinished():
        for output in engine.step():
            text = output.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _build_engine(args)
    params = _sampling_params(args)
    prompts = args.prompt or [sys.stdin.read()]
    for i, prompt in enumerate(prompts):
        if args.chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            prompt = engine.tokenizer.encode(text, add_special_tokens=False)
        _stream(engine, f"cli-{i}", prompt, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _build_engine(args)
    params = _sampling_params(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("duoserve chat: an empty line or Ctrl-D ends the conversation.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        text = engine.tokenizer.apply_chat_template(messages)
        reply = _stream(
            engine, f"chat-{turn}", engine.tokenizer.encode(text, add_special_tokens=False), params
        )
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from duoserve.plan.trace import step_trace_observer
    from duoserve.server.launcher import serve
    from duoserve.server.settings import settings_from_args

    config, settings = engine_config_from_args(args), settings_from_args(args)
    # --step-trace: the planner's writer, handed to the server's engine process (duoserve/plan/trace.py).
    observer = step_trace_observer(config.step_trace, settings.role)
    return serve(config, settings, kv_endpoints_from_args(args), observer)


def cmd_kv_scales(args: argparse.Namespace) -> int:
    """Formerly: calibrate static KV scales for --kv-scales-path. Quantized KV caches now scale each row as
    it is written (duoserve/kv/quant.py): nothing to calibrate, said instead of a bare "invalid choice"."""
    from duoserve.config import KV_SCALES_GONE

    print(f"duoserve kv-scales: {KV_SCALES_GONE}", file=sys.stderr)
    return 2


def cmd_env(args: argparse.Namespace) -> int:
    from duoserve.env import env_report

    print(env_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description="LLM inference serving.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text for prompts (offline, streamed)")
    generate.add_argument("prompt", nargs="*", help="prompts (default: read one from stdin)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_engine_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat with the model")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    add_engine_args(serve, positional_model=True)
    add_server_args(serve)
    add_kv_endpoint_args(serve)
    serve.set_defaults(func=cmd_serve)

    env = commands.add_parser(
        "env", help="this host's defaults (dtype, kernels, threads) and why, with versions: for bug reports"
    )
    env.set_defaults(func=cmd_env)

    kv_scales = commands.add_parser(
        "kv-scales",
        help="no longer needed: quantized KV caches scale each (token, KV head) as it is written",
    )
    kv_scales.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    kv_scales.set_defaults(func=cmd_kv_scales)

    add_router_parsers(commands)
    add_bench_parser(commands)
    add_plan_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "bench":
        return run_bench(args)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
