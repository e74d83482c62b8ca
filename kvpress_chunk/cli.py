"""The ``kvpress-chunk`` command.

* ``kvpress-chunk demo``: a needle-in-a-haystack question answered by the embedded SmolLM2 with
  several presses and compression ratios, as a table.
* ``kvpress-chunk presets``: the registry (presets and parts).
"""

from __future__ import annotations

import argparse
import sys
import time


def _parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _parse_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_presets(args: argparse.Namespace) -> int:
    from . import list_presets, registered
    from .policies.presets import preset_parameters

    print("Presets (make_press(name, compression_ratio=... | budget=..., **params)):")
    for name, doc in list_presets().items():
        params = ", ".join(f"{k}={v!r}" for k, v in preset_parameters(name).items())
        print(f"  {name:<16} {doc}\n  {'':<16} params: {params or '(none)'}")
    print("\nParts (spec: 'name(key=value, ...)'):")
    for kind in ("scorer", "grouper", "selector", "planner"):
        print(f"  {kind + 's':<10} {', '.join(sorted(registered(kind)))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import generate_answers, make_press
    from .eval.needle import is_hit, make_needle_case
    from .hf.models import ModelNotInstalledError, load_model

    try:
        model, tokenizer = load_model(args.model)
    except (ModelNotInstalledError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    case = make_needle_case(tokenizer, args.length, args.depth, args.seed)
    print(f"needle {case.answer!r} at depth {case.depth:.0%} of a {case.context_tokens}-token haystack; "
          f"question not seen while compressing\n")
    runs = [("full cache", None, 0.0)] + [(name, name, ratio) for name in args.presses for ratio in args.ratios]
    rows = []
    start = time.perf_counter()
    for label, name, ratio in tqdm(runs, desc="answering", unit="run", file=sys.stderr):
        press = None if name is None else make_press(name, compression_ratio=ratio, compile=args.compile)
        kept = []

        answer = generate_answers(model, tokenizer, case.context, [case.question], press=press,
                                  max_new_tokens=args.max_new_tokens, on_prefill=lambda ctx: kept.append(ctx.cache_mask.shape[-1]))[0]
        rows.append((label, ratio, kept[0] if kept else None, is_hit(answer, case.answer), answer))
    print(f"{'press':<14} {'ratio':>5} {'kept':>6}  {'hit':<4} answer")
    for label, ratio, kept, hit, answer in rows:
        print(f"{label:<14} {ratio:>5.2f} {kept if kept is not None else '-':>6}  {'yes' if hit else 'no':<4} {answer[:70]!r}")
    print(f"\n{sum(r[3] for r in rows)}/{len(rows)} hits in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress-chunk", description="KV-cache compression (ChunkKV and friends) for HF models")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sub.add_parser("presets", help="list presets and registered parts")
    presets.set_defaults(func=cmd_presets)
    demo = sub.add_parser("demo", help="needle-in-a-haystack on the embedded model, several presses and ratios")
    demo.add_argument("--presses", type=_parse_names, default=["chunkkv", "snapkv", "streamingllm", "knorm"])
    demo.add_argument("--ratios", type=_parse_floats, default=[0.5, 0.75, 0.9])
    demo.add_argument("--length", type=int, default=2000, help="haystack tokens (default 2000)")
    demo.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--model", default=None, help="a local HF model folder (default: embedded SmolLM2)")
    demo.add_argument("--compile", action="store_true",
                      help="run the fused op through torch.compile (~20 s first-call cost per preset; "
                           "pays off for long-running use, not for a dozen prefills)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
