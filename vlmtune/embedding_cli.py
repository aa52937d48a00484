"""The dual-encoder commands: `vlmtune contrastive train|recall|merge` and `vlmtune index build|search`."""

from __future__ import annotations

import argparse
import json


def cmd_contrastive_recall(args) -> int:
    from .contrastive.evaluate import contrastive_recall, recall_table

    result = contrastive_recall(args.adapter, data=args.data, batch_size=args.batch_size)
    print(json.dumps(result, indent=2) if args.json else recall_table(result))
    return 0


def cmd_contrastive_merge(args) -> int:
    from .contrastive.merge import merge_contrastive

    merge_contrastive(args.adapter, args.out, force=args.force)
    return 0


def cmd_index_build(args) -> int:
    from .index import build_index

    build_index(args.model, args.images, args.out, kind=args.kind, batch_size=args.batch_size, fmt=args.format,
                image_root=args.image_root, overwrite=args.overwrite, nlist=args.nlist, progress=not args.no_progress)
    return 0


def cmd_index_search(args) -> int:
    from .index import load_index

    index = load_index(args.index)
    if not index.complete:
        print(f"note: {args.index} is a partial index ({len(index.paths)} of {index.manifest['count']} images); "
              "rerun `vlmtune index build` with the same arguments to finish it")
    for path, score in index.search(args.query, k=args.k):
        print(json.dumps({"path": path, "score": round(score, 4)}) if args.json else f"{score:.4f}  {path}")
    return 0


def add_embedding_commands(sub, train_command) -> None:
    """`train_command`: the CLI's `vlmtune train` (cli.cmd_sft), which `vlmtune contrastive train` is a spelling of."""
    c = sub.add_parser("contrastive", help="contrastive LoRA of a CLIP / SigLIP model (method: contrastive)")
    csub = c.add_subparsers(dest="contrastive_command", required=True)
    p = csub.add_parser("train", help="train a contrastive LoRA adapter from a recipe (as `vlmtune train` does)")
    p.add_argument("recipe", help="recipe YAML file (method: contrastive)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. train.max_steps=10")
    p.add_argument("--overwrite", action="store_true", help="replace a run in output_dir once the new one is complete")
    p.set_defaults(func=train_command, method="contrastive")
    p = csub.add_parser("recall", help="recall@1/5/10 of an adapter beside its base model")
    p.add_argument("adapter", help="the run's output folder")
    p.add_argument("--data", help="caption data file (default: the run's data.eval)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_contrastive_recall)
    p = csub.add_parser("merge", help="fold the adapter into its base: a CLIPModel / SiglipModel folder")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--force", action="store_true", help="replace `out` if it exists")
    p.set_defaults(func=cmd_contrastive_merge)

    i = sub.add_parser("index", help="FAISS image index with a CLIP / SigLIP model or adapter")
    isub = i.add_subparsers(dest="index_command", required=True)
    p = isub.add_parser("build", help="embed every image into an index (resumable: rerun to continue)")
    p.add_argument("--model", required=True, help="model folder, hub id, builtin:tiny-clip, or a contrastive adapter")
    p.add_argument("--images", required=True, help="a folder of images, or a data file naming them")
    p.add_argument("--out", required=True, help="the index folder")
    p.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat: exact inner product (default); ivf / hnsw: approximate, for large collections")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--format", default="caption", help="the data file's row layout (default caption)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--nlist", type=int, default=None, help="ivf: number of lists (default ~4 sqrt(n))")
    p.add_argument("--overwrite", action="store_true", help="replace an index of other images or another model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_index_build)
    p = isub.add_parser("search", help="the images nearest a text query")
    p.add_argument("index")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    p.set_defaults(func=cmd_index_search)
    for parser in (c, i):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
