"""Command line: argument parsing only; each command calls one API function."""

from __future__ import annotations

import argparse
import sys
import traceback

from .config import RecipeError, load_recipe
from .errors import VlmtuneError


def _recipe(args):
    return load_recipe(args.recipe, overrides=list(args.overrides))


def cmd_sft(args) -> int:
    from .training import train

    result = train(_recipe(args))
    m = result.metrics
    print(f"done: {m.get('global_step', '?')} steps, train loss {m.get('train_loss', float('nan')):.4f}, "
          f"{m.get('train_samples_per_second', 0):.2f} samples/s -> {result.output_dir}")
    return 0


def cmd_validate(args) -> int:
    from .preflight import plan_run

    plan = plan_run(_recipe(args))
    print(f"recipe OK: {args.recipe} (family {plan.family.name}, {plan.runtime.device})")
    print("train data: " + plan.train.summary())
    if plan.eval is not None:
        print("eval data: " + plan.eval.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description="LoRA/QLoRA fine-tuning of vision-language models")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("sft", cmd_sft, "train a LoRA adapter from a recipe"),
        ("validate", cmd_validate, "check a recipe, its model and every data row without training"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. train.max_steps=10")
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
