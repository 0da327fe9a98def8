"""The `selfsup` command. Each subcommand ends with one JSON line on stdout holding its results;
logs and progress go to stderr. Bad arguments and bad data end with one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from pipelines.shards import DataError


class UsageError(ValueError):
    """A bad argument or config value, found before Ray starts."""


def parse_sets(pairs: list[str]) -> dict:
    """`["a.b=1", "c=[1,2]"]` -> `{"a.b": 1, "c": [1, 2]}`; values are parsed as YAML."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def start_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus, logging_level="WARNING")


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def cmd_prepare(args) -> dict:
    from pipelines.prepare import PrepareConfig, plan_source, prepare

    config = PrepareConfig(
        shard_mb=args.shard_mb,
        row_group_mb=args.row_group_mb,
        max_bad_fraction=args.max_bad_fraction,
        overwrite=args.overwrite,
    )
    if not (config.shard_mb > 0 and config.row_group_mb > 0):
        raise UsageError("--shard-mb and --row-group-mb must be > 0")
    if not 0 <= config.max_bad_fraction <= 1:
        raise UsageError(f"--max-bad-fraction {config.max_bad_fraction}: must be in [0, 1]")
    plan_source(args.src)  # a missing or unusable source fails here, before Ray starts
    start_ray(args.num_cpus)
    return prepare(args.src, args.out, config)


def cmd_viz_augment(args) -> dict:
    from pipelines.viz import augment_picture, default_recipe, first_canvases

    try:
        recipe = default_recipe(args.method, args.canvas_size).with_overrides(parse_sets(args.set))
    except ValueError as error:
        raise UsageError(str(error)) from None
    canvases = first_canvases(args.data, args.images, args.canvas_size)
    picture = augment_picture(canvases, recipe, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    picture.save(args.out)
    return {"out": args.out, "images": len(canvases), "views": recipe.names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="write Parquet image shards from a folder, a Parquet or sample:NAME")
    prepare.add_argument("src", help="image folder (subfolders = classes), image Parquet, or sample:digits|sample:mnist")
    prepare.add_argument("--out", required=True, help="output folder or URI")
    prepare.add_argument("--shard-mb", type=float, default=256.0, help="target shard size (MB)")
    prepare.add_argument("--row-group-mb", type=float, default=8.0, help="target row-group size (MB)")
    prepare.add_argument("--max-bad-fraction", type=float, default=0.5, help="fail above this fraction of bad images")
    prepare.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    prepare.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    prepare.set_defaults(run=cmd_prepare)

    viz = commands.add_parser("viz", help="draw pictures").add_subparsers(dest="picture", required=True)
    augment = viz.add_parser("augment", help="originals beside their augmented views")
    augment.add_argument("--data", required=True, help="shard folder or URI")
    augment.add_argument("--method", required=True, choices=["simclr", "dino", "mae"])
    augment.add_argument("--out", required=True, help="PNG file to write")
    augment.add_argument("--images", type=int, default=6)
    augment.add_argument("--canvas-size", type=int, default=64)
    augment.add_argument("--seed", type=int, default=0)
    augment.add_argument("--set", action="append", default=[], metavar="VIEW.FIELD=VALUE", help="recipe override")
    augment.set_defaults(run=cmd_viz_augment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        emit(args.run(args))
    except (UsageError, DataError) as error:
        print(f"selfsup {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
