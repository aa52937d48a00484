"""``python -m vlmtune.demo make-data OUT_DIR`` | ``make-pairs SHAPES_DIR`` | ``build-model NAME``."""

from __future__ import annotations

import argparse

from . import BUILTIN_MODELS, builtin_model_path, make_shapes_dataset


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.demo", description="vlmtune offline demo assets")
    sub = parser.add_subparsers(dest="cmd", required=True)
    data = sub.add_parser("make-data", help="write the synthetic shapes dataset")
    data.add_argument("out_dir")
    data.add_argument("--n-train", type=int, default=256)
    data.add_argument("--n-eval", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--size", type=int, default=56)
    pairs = sub.add_parser("make-pairs", help="write preference pairs (plain layout) beside a shapes dataset")
    pairs.add_argument("shapes_dir")
    model = sub.add_parser("build-model", help="build (or find) a builtin tiny model and print its path")
    model.add_argument("name", choices=sorted(BUILTIN_MODELS))
    args = parser.parse_args(argv)
    if args.cmd == "make-data":
        print(make_shapes_dataset(args.out_dir, args.n_train, args.n_eval, args.seed, args.size))
    elif args.cmd == "make-pairs":
        from .pairs import make_shapes_pairs

        print(*make_shapes_pairs(args.shapes_dir), sep="\n")
    else:
        print(builtin_model_path(args.name))


if __name__ == "__main__":
    _main()
