"""Command line: argument parsing only; each command calls one API function."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import __version__
from .config import RecipeError, load_recipe
from .data.formats import FORMATS
from .errors import FieldError, VlmtuneError
from .hygiene import cli as hygiene_cli


def _recipe(args):
    overrides = list(args.overrides)
    wanted = getattr(args, "method", None)  # `vlmtune sft` / `vlmtune dpo`: the command names the method
    if wanted is not None:
        said = _method_in(args.recipe, overrides)
        if said not in (None, wanted):
            raise RecipeError([FieldError("method", f"is {said!r} in this recipe, but `vlmtune {wanted}` trains "
                                          f"{wanted}: run `vlmtune train {args.recipe}`, or set method: {wanted}")],
                              args.recipe)
        overrides = [f"method={wanted}", *overrides]
    return load_recipe(args.recipe, overrides=overrides)


def _method_in(path: str, overrides: list[str]) -> str | None:
    """The method a recipe file and its overrides name (the last word wins), None where neither does."""
    import yaml

    said = None
    try:
        raw = yaml.safe_load(open(path, encoding="utf-8")) or {}
        said = raw.get("method") if isinstance(raw, dict) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass  # load_recipe reports the file's problem
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "method":
            said = value.strip()
    return said


def cmd_sft(args) -> int:
    from . import distributed
    from .curves import CURVES
    from .training import train

    recipe = _recipe(args)
    if distributed.needs_launch(recipe):  # more than one process asked for, and no launcher started this one
        return distributed.relaunch(recipe, args.argv, entry=distributed.entry_script(),
                                    log=lambda m: print(m, file=sys.stderr))
    result = train(recipe, overwrite=args.overwrite)
    if not distributed.is_main_process():
        return 0
    m = result.metrics
    print(f"done: {m.get('global_step', '?')} steps, train loss {m.get('train_loss', float('nan')):.4f}, "
          f"{m.get('train_samples_per_second', 0):.2f} samples/s -> {result.output_dir}")
    if (result.output_dir / CURVES).is_file():
        print(f"training curves: {result.output_dir / CURVES}")
    return 0


def cmd_validate(args) -> int:
    from .validation import validate

    recipe = _recipe(args)
    report = validate(recipe, decode_images=args.decode)
    print(f"recipe OK: {args.recipe} (family {report.family})")
    print(report.render())
    if hygiene_cli.wanted(args):
        hygiene_cli.run(args, recipe)
    return 0 if report.ok else 2


def cmd_inspect(args) -> int:
    import json

    from .pair_inspection import inspect_recipe

    result = inspect_recipe(_recipe(args), num=args.num, index=args.index)
    if args.json:
        for sample in result.samples:
            print(json.dumps(sample.to_json()))
    else:
        print(result.render(color=sys.stdout.isatty()))
    return 0


def cmd_merge_adapter(args) -> int:
    from .merge import merge_adapter

    merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype, shard_size=args.shard_size,
                  force=args.force, check=not args.no_check)
    return 0


def cmd_predict(args) -> int:
    from .inference import exact_matches, predict

    records = predict(args.model, images=args.image, prompt=args.prompt, data=args.data, out=args.out,
                      base=args.base, image_root=args.image_root, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                      dtype=args.dtype, data_format=args.format, retrieve=args.retrieve, k=args.k)
    if args.prompt is not None:
        print(records[0]["prediction"] or "(empty reply: the model ended its turn at once)")
        if args.retrieve is not None:
            from .inference.retrieval import render_retrieved

            print(render_retrieved(records[0]))
    else:
        hits, scored = exact_matches(records)
        score = f"; {hits}/{scored} equal their reference answer" if scored else ""
        print(f"{len(records)} predictions" + (f" written to {args.out}" if args.out else "") + score)
        if not args.out:
            for r in records:
                print(f"{r['source']}: {r['prediction']}")
                if "retrieved" in r:
                    print("  retrieved: " + ", ".join(f"{h['path']} ({h['score']:.4f})" for h in r["retrieved"]))
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate

    result = evaluate(args.model, args.data, metrics=args.metric or ["auto"], against=args.against, out=args.out,
                      overwrite=args.overwrite, data_format=args.format, image_root=args.image_root, base=args.base,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      bootstrap=args.bootstrap, dtype=args.dtype, log=lambda m: print(m, file=sys.stderr))
    print(result.render())
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a model or adapter on a data file, side by side with its base model "
                                    "(a CLIP / SigLIP model or adapter: image<->text recall@k)")
    p.add_argument("model", help="adapter folder, merged model folder, or model id/folder (a VLM, or a dual "
                                 "encoder: CLIP / SigLIP folder, builtin:tiny-clip, contrastive adapter)")
    p.add_argument("--data", required=True, help="data file (see --format) whose rows end in the reference answer")
    p.add_argument("--format", choices=FORMATS,
                   help="data format of --data (default: the one the adapter was trained on, else messages)")
    p.add_argument("--image-root", help="folder that relative image paths in --data are relative to")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="metric to score (repeatable; default auto: chosen from the data format; a dual "
                        "encoder: recall@K, default recall@1, recall@5 and recall@10)")
    p.add_argument("--against", help="base (default for an adapter: its bare base model, in the same run), "
                                     "a model or adapter folder to compare with, or none")
    p.add_argument("--out", help="folder for predictions.jsonl and summary.json (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier eval in --out")
    p.add_argument("--base", help="base model for an adapter folder (default: from its vlmtune.json)")
    p.add_argument("--batch-size", type=int, help="rows generated (a dual encoder: images / captions embedded) "
                                                  "at a time (default 8; a dual encoder: 64)")
    p.add_argument("--max-new-tokens", type=int, help="longest reply generated (default 64; not for a dual encoder)")
    p.add_argument("--seed", type=int, default=0, help="generation seed and bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the Δ intervals")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=cmd_eval)


def _add_merge_and_predict(sub) -> None:
    p = sub.add_parser("merge-adapter", help="merge a LoRA adapter into its full-precision base model")
    p.add_argument("adapter", help="adapter folder written by `vlmtune sft`")
    p.add_argument("--out", required=True,
                   help="output folder for the merged model (new, empty, or an earlier merge with --force)")
    p.add_argument("--base", help="base model folder or id (default: the one in the adapter's vlmtune.json)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights (default: the base's)")
    p.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--force", action="store_true",
                   help="replace an --out that an earlier merge wrote (never any other folder)")
    p.add_argument("--no-check", action="store_true", help="skip the logits parity check against base + adapter")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=cmd_merge_adapter)
    p = sub.add_parser("predict", help="generate with a merged model or a base + adapter")
    p.add_argument("model", help="merged model folder, adapter folder, or model id/folder")
    p.add_argument("--image", action="append", default=[], help="image file for --prompt (repeatable)")
    p.add_argument("--prompt", help="the user's question")
    p.add_argument("--retrieve", metavar="INDEX", help="image index (`vlmtune index build`): its top -k images for "
                                                       "the --prompt's text are the prompt's images (with --data: "
                                                       "each row's, for its question, rows without images)")
    p.add_argument("-k", type=int, help="how many images --retrieve gives the prompt (default 4)")
    p.add_argument("--data", help="data file (any data format, see --format) or dataset_info.json#name: one prediction per row")
    p.add_argument("--out", help="write predictions as JSONL here (as they come, to <out>.partial until done)")
    p.add_argument("--format", choices=FORMATS,
                   help="data format of --data (default: the one the adapter was trained on, else messages)")
    p.add_argument("--base", help="base model for an adapter folder (default: from its vlmtune.json)")
    p.add_argument("--image-root", help="folder that relative image paths in --data are relative to")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description="LoRA/QLoRA fine-tuning of vision-language models")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("train", cmd_sft, "train a LoRA adapter from a recipe with its method (method: sft | dpo | contrastive)"),
        ("sft", cmd_sft, "train a LoRA adapter by supervised fine-tuning (method: sft)"),
        ("dpo", cmd_sft, "train a LoRA adapter by preference tuning on chosen/rejected pairs (method: dpo)"),
        ("validate", cmd_validate, "check a recipe, its model and every data row without training"),
        ("inspect", cmd_inspect, "show formatted samples with the supervised tokens highlighted"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. train.max_steps=10")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if name in ("sft", "dpo"):
            p.set_defaults(method=name)
        if name in ("train", "sft", "dpo"):
            p.add_argument("--overwrite", action="store_true",
                           help="replace a run already in output_dir (kept whole until the new one is complete)")
        if name == "validate":
            p.add_argument("--decode", action="store_true",
                           help="decode every image in full (slower): also finds truncated or corrupt pixel data")
            hygiene_cli.add_arguments(p)
        if name == "inspect":
            p.add_argument("--num", type=int, default=3, help="how many samples (default 3)")
            p.add_argument("--index", type=int, default=None, help="show only the sample at this 0-based row index")
            p.add_argument("--json", action="store_true", help="one JSON object per sample and line")
        p.set_defaults(func=func)
    _add_merge_and_predict(sub)
    _add_eval(sub)
    from .embedding_cli import add_embedding_commands

    add_embedding_commands(sub, train_command=cmd_sft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a re-launch under torchrun/deepspeed runs again
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, rather than at interpreter exit
        return code
    except BrokenPipeError:  # `vlmtune inspect ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs on SIGPIPE advise
        return 141
    except (RecipeError, VlmtuneError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written to the output folder (checkpoints already saved are complete)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
