"""The `selfsup` command. Each subcommand ends with one JSON line on stdout holding its results;
logs and progress go to stderr. Bad arguments and bad data end with one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from pipelines.train.local_ray import (
    keep_local_ray_on_loopback,
    pin_ray_address,
    use_local_train_settings,
    warm_workers_config,
)

keep_local_ray_on_loopback()  # before anything imports Ray: a local Ray listens on loopback only

from pipelines.console import UsageError, end_transient, log, stdout_while_running, to_stderr  # noqa: E402
from pipelines.images.samples import SAMPLES  # noqa: E402
from pipelines.images.shards import DataError  # noqa: E402
from pipelines.train.stops import NonFiniteLossError, RunInterrupted  # noqa: E402

CHECKPOINT_HELP = ("a checkpoint folder (RUN/checkpoint_...) or a run folder (RUN, e.g. runs/NAME: its newest "
                   "checkpoint that loads)")
SHARDS_HELP = "Parquet shards written by `selfsup prepare` (a folder or URI; a folder of images: prepare it first)"
PROBE_HELP = ("shards to draw the probe set from (the unlabeled images the label-free metrics are measured on; "
              "default: the training shards; train.probe_size sets its size, 0 turns it off)")
# Ray Data's own logging config with its console handler at WARNING: its INFO lines (plans,
# "execution finished") stay in the session's ray-data.log.
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images", "ray_data_logging.yaml")


def quiet_console() -> None:
    """selfsup's lines on stderr, Ray Data's INFO lines in its log file only (local runs; on a
    cluster the workers' logs never reach this console)."""
    to_stderr()
    # Ray's notice that token authentication is on advises turning it off; selfsup keeps it on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)


# Method names are not listed here: the registry (methods/) knows them, and importing it (torch,
# timm, Kornia) would slow every `selfsup --help`; an unknown name is refused with the list.
METHOD_HELP = "a method of methods/ (simclr, mae, dino, ...; an unknown name lists them)"


def parse_sets(pairs: list[str]) -> dict:
    """`["a.b=1", "c=[1,2]"]` -> `{"a.b": 1, "c": [1, 2]}`; values are parsed as YAML."""
    from pipelines.config import parse_value

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = parse_value(value)
    return out


_started_ray = False  # set when this command, not its caller, connected to Ray


def start_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray."""
    import ray

    from pipelines.console import forward_worker_logs

    global _started_ray
    if ray.is_initialized():
        return
    _started_ray = True
    # Worker output stays in Ray's log files; selfsup's own lines reach the console through
    # pipelines.console (SELFSUP_RAY_LOGS=all forwards everything, for debugging).
    options = {"logging_level": "WARNING", "log_to_driver": forward_worker_logs()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
    else:
        # Its workers are pinned to it: another Ray on the machine must not answer their state-API calls.
        use_local_train_settings()
        ray.init(num_cpus=num_cpus, runtime_env={"worker_process_setup_hook": pin_ray_address},
                 _system_config=warm_workers_config(num_cpus), **options)


_stdout = sys.stdout  # where the final JSON line goes; everything else printed goes to stderr


def emit(result: dict) -> None:
    """The final JSON line. Ray is shut down first (when this command started or joined it) so
    that no worker log line it forwards can land after it."""
    if _started_ray:
        import ray

        ray.shutdown()
    sys.stderr.flush()
    print(json.dumps(result, default=str), file=_stdout, flush=True)


def cmd_prepare(args) -> dict:
    from pipelines.images.prepare import PrepareConfig, held_out_ids, held_out_images, plan_source, prepare
    from pipelines.images.shards import check_output_folder

    config = PrepareConfig(
        shard_mb=args.shard_mb,
        row_group_mb=args.row_group_mb,
        max_bad_fraction=args.max_bad_fraction,
        overwrite=args.overwrite,
        test_fraction=args.test_fraction,
    )
    if not (config.shard_mb > 0 and config.row_group_mb > 0):
        raise UsageError("--shard-mb and --row-group-mb must be > 0")
    if not 0 <= config.max_bad_fraction <= 1:
        raise UsageError(f"--max-bad-fraction {config.max_bad_fraction}: must be in [0, 1]")
    if config.test_fraction and not 0 < config.test_fraction < 1:
        raise UsageError(f"--test-fraction {config.test_fraction}: must be in (0, 1)")
    source = plan_source(args.src)  # a missing or unusable source fails here, before Ray starts
    if config.test_fraction:
        if source.kind == "sample":
            raise UsageError(f"--test-fraction: {args.src} is a sample source with fixed train/test splits")
        if source.kind == "folder":
            held_out_images(source, config.test_fraction)  # refuses an empty split
        else:
            held_out_ids(args.src, config.test_fraction)  # ids to split by, and no empty split
    if not config.overwrite:
        check_output_folder(args.out, overwrite=False)  # an output holding shards, too
    start_ray(args.num_cpus)
    return prepare(args.src, args.out, config, source)


def run_config(args, options: dict):
    """The validated run config of a pretrain or tune command (`--method`, `--preset`, `--config`,
    `--set`, then the command's own `options`, `{"section.key": value}`, those not None), and a
    model built from it once: architecture mismatches (e.g. width vs heads) surface only when the
    model is built."""
    from methods.base import checked_groups
    from pipelines.config import build_config, build_method, pinned_config

    sets = {**parse_sets(args.set), **{key: value for key, value in options.items() if value is not None}}
    try:
        config = pinned_config(build_config(args.method, args.preset, args.config, sets))
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        method = build_method(config)
    except Exception as error:  # noqa: BLE001  (timm raises AssertionError, TypeError, ...)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"model: cannot build {config.method} with this config ({message})") from None
    checked_groups(method.param_groups(config.optim.weight_decay))  # what the workers will check, before Ray
    return config


def cmd_pretrain(args) -> dict:
    from pipelines.images.shards import find_shards, first_image_size
    from pipelines.train.preflight import check_rerun, preflight, start_line
    from pipelines.train.pretrain import pretrain
    from pipelines.weights.init_from import initial_weights

    config = run_config(args, {"train.workers": args.workers, "train.probe": args.probe,
                               "train.init_from": args.init_from})
    init = initial_weights(config)  # weights that do not fit the backbone are refused before Ray
    plan = preflight(config, args.data, args.val, args.storage, args.name, args.gpus_per_worker, args.num_cpus)
    complete = check_rerun(config, plan, args.storage, args.name, args.resume)
    if complete:
        return complete
    log.info(start_line(config, plan, first_image_size(find_shards(args.data))))
    start_ray(args.num_cpus)
    return pretrain(config, args.data, plan, val=args.val, gpus_per_worker=args.gpus_per_worker,
                    storage=args.storage, name=args.name, init=init)


def cmd_tune(args) -> dict:
    import time

    from methods import get_method
    from pipelines.train.preflight import preflight, storage_path
    from pipelines.weights.init_from import initial_weights
    from tune.search import SearchSettings, check_space, run_search
    from tune.space import parse_space

    config = run_config(args, {"train.workers": args.workers_per_trial, "train.probe": args.probe})
    initial_weights(config)  # `--set train.init_from` weights that do not fit: refused here, not in every trial
    settings = SearchSettings(samples=args.samples, gpus_per_worker=args.gpus_per_worker, scheduler=args.scheduler,
                              max_concurrent=args.max_concurrent, metric=args.metric, mode=args.mode,
                              grace_epochs=args.grace_epochs)
    try:
        settings = settings.resolved(has_val=bool(args.val), has_probe=config.train.probe_size > 0,
                                     label_free=get_method(config.method).label_free)
        dimensions = parse_space(args.space, config.method)
    except ValueError as error:
        raise UsageError(str(error)) from None
    plan = preflight(config, args.data, args.val, args.storage, args.name, args.gpus_per_worker, args.num_cpus)
    try:
        check_space(config.to_dict(), dimensions, plan.train_rows, args.data)
    except ValueError as error:
        raise UsageError(str(error)) from None
    start_ray(args.num_cpus)
    name = args.name or f"tune-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_search(config.to_dict(), args.data, plan.train_rows, args.val, dimensions, settings,
                      storage_path(args.storage), name)


def cmd_eval(args) -> dict:
    from pipelines.evaluate.frozen import evaluate_checkpoint, result_line
    from pipelines.images.shards import checked_shards
    from pipelines.weights.checkpoint import find_checkpoint

    args.checkpoint = find_checkpoint(args.checkpoint)
    sizes = [checked_shards(location).num_rows for location in (args.train, args.test)]
    floors = "" if args.no_baselines else ", beside the random-init encoder and raw pixels"
    fit = "kNN bank" if args.protocol == "knn" else "linear probe"
    log.info(f"eval {args.protocol}: the frozen encoder of {args.checkpoint}, its {fit} fit on {sizes[0]:,} labeled "
             f"images and scored on {sizes[1]:,}{floors}; starting Ray")
    start_ray(args.num_cpus)
    result = evaluate_checkpoint(args.checkpoint, args.train, args.test, args.protocol, baselines=not args.no_baselines)
    log.info(result_line(result))
    return result


def init_from_config(args):
    """The config of `--method` (`--method-preset`) with `--init-from`'s weights: the architecture
    those weights must fit."""
    from pipelines.config import build_config

    if not args.method:
        raise UsageError("--init-from: name the architecture with --method (and --method-preset)")
    try:
        return build_config(args.method, args.method_preset, None, {"train.init_from": args.init_from})
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_finetune(args) -> dict:
    from pipelines.images.labeled import check_test_classes, labeled_subset
    from pipelines.images.shards import check_output_folder
    from pipelines.outputs.export import export_classifier
    from pipelines.train.finetune import finetune, load_classifier, plan_finetune
    from pipelines.train.preflight import check_local_cpus
    from pipelines.weights.checkpoint import find_checkpoint, load_checkpoint
    from pipelines.weights.init_from import initial_weights

    if bool(args.checkpoint) == bool(args.init_from):
        raise UsageError("give --checkpoint (a pretraining run's) or --init-from (weights, with --method)")
    if args.labels_per_class is not None and args.labels_per_class < 1:
        raise UsageError(f"--labels-per-class {args.labels_per_class}: must be >= 1")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise UsageError(f"--label-fraction {args.label_fraction}: must be in (0, 1]")
    if args.checkpoint:
        source = find_checkpoint(args.checkpoint)
        method, base = load_checkpoint(source)
        weights = {key: value.cpu() for key, value in method.encoder().state_dict().items()}
    else:
        base = init_from_config(args)
        source, weights = args.init_from, initial_weights(base)[0]
    labeled = labeled_subset(args.data, args.labels_per_class, args.label_fraction)
    check_test_classes(args.test, labeled)
    if args.out and not args.overwrite:
        check_output_folder(args.out, overwrite=False)
    sets = {**parse_sets(args.set), **({"train.workers": args.workers} if args.workers else {})}
    try:
        run = plan_finetune(base, labeled, args.preset, sets)
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_local_cpus(run.config, args.num_cpus)
    start_ray(args.num_cpus)
    result = finetune(run, args.test, weights, scratch=not args.no_scratch, storage=args.storage, name=args.name,
                      gpus_per_worker=args.gpus_per_worker)
    result.update(labels_per_class=args.labels_per_class, label_fraction=args.label_fraction, init=source)
    if args.out:
        classifier = load_classifier(result["checkpoints"]["top1"], run)
        result["export"] = export_classifier(classifier, run.config, labeled.num_classes, args.out,
                                             {"finetuned_from": source, "top1": result["top1"]}, args.overwrite)
    return result


def cmd_viz_augment(args) -> dict:
    from pipelines.outputs.viz import augment_picture, default_recipe, first_canvases, masking_of

    try:
        recipe = default_recipe(args.method, args.canvas_size).with_overrides(parse_sets(args.set))
    except ValueError as error:
        raise UsageError(str(error)) from None
    canvases = first_canvases(args.data, args.images, args.canvas_size)
    picture = augment_picture(canvases, recipe, seed=args.seed, masking=masking_of(args.method))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    picture.save(args.out)
    return {"out": args.out, "images": len(canvases), "views": recipe.names}


def cmd_demo(args) -> dict:
    """The main job on the bundled sample: prepare it, draw the views, pretrain SimCLR (its `demo`
    preset) for a few CPU minutes, and compare the encoder's kNN with the random-init floor and
    raw pixels."""
    from methods import METHODS
    from pipelines.config import build_config
    from pipelines.evaluate.frozen import evaluate_checkpoint
    from pipelines.images.prepare import PrepareConfig, prepare
    from pipelines.images.shards import find_shards
    from pipelines.outputs.viz import augment_picture, default_recipe, first_canvases, masking_of
    from pipelines.train.plan import plan_run
    from pipelines.train.preflight import check_rerun
    from pipelines.train.pretrain import pretrain

    # The demo scores the encoder once at the end (below), so no online kNN during training.
    sets = {"train.knn_every_epochs": 0, **({} if args.epochs is None else {"optim.epochs": args.epochs})}
    config = build_config("simclr", "demo", sets=sets)
    data = os.path.join(args.workdir, "data", args.sample)
    pictures = os.path.join(args.workdir, "pictures")
    os.makedirs(pictures, exist_ok=True)
    log.info(f"demo: starting Ray, then writing sample:{args.sample} to {data}")
    start_ray(args.num_cpus)
    prepared = prepare(f"sample:{args.sample}", data, PrepareConfig(overwrite=True))
    canvases = first_canvases(f"{data}/train", 6, 32)
    drawn = {}
    for method in sorted(METHODS):
        drawn[method] = os.path.join(pictures, f"augment_{method}.png")
        recipe = config.recipe() if method == config.method else default_recipe(method, 32)  # what the demo trains
        augment_picture(canvases, recipe, masking=masking_of(method)).save(drawn[method])
    # One run folder per sample and epochs: a rerun with the same ones returns the finished run.
    storage, name = os.path.join(args.workdir, "runs"), f"demo-{args.sample}-{config.optim.epochs}ep"
    plan = plan_run(config, find_shards(f"{data}/train").num_rows, f"{data}/train")
    run = check_rerun(config, plan, storage, name)
    if run is None:
        log.info(f"demo: views drawn in {pictures}; pretraining SimCLR ({config.optim.epochs} epochs)")
        run = pretrain(config, f"{data}/train", plan, val=f"{data}/test", storage=storage, name=name)
    knn = evaluate_checkpoint(run["checkpoint"], f"{data}/train", f"{data}/test", "knn", also=("linear",))
    linear = knn.pop("linear")
    for name, scores in (("kNN", knn), ("linear", linear)):
        log.info(f"demo: {name} top-1 on {args.sample} test: SimCLR {scores['top1']:.3f} | random-init encoder "
                 f"{scores['random_init_top1']:.3f} | raw pixels {scores['raw_pixels_top1']:.3f}")
    return {"data": data, "images_written": prepared["images_written"], "pictures": drawn,
            "checkpoint": run["checkpoint"], "pretrain_metrics": run["metrics"], "knn": knn, "linear": linear}


def _method_args(parser) -> None:
    parser.add_argument("--method", required=True, help=METHOD_HELP)
    parser.add_argument("--preset", default=None, help="the method's best recipe on the CPU sample when not given "
                        "(tiny; simclr: demo), or tiny, imagenet (the paper's); simclr also has demo")
    parser.add_argument("--config", help="YAML config (sections: backbone, hparams, views, data, optim, train)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.epochs=2")


def cmd_viz_mae(args) -> dict:
    from pipelines.outputs.viz import first_canvases, mae_picture
    from pipelines.weights.checkpoint import find_checkpoint, load_checkpoint

    try:
        ratios = [float(r) for r in args.mask_ratios.split(",")]
    except ValueError:
        raise UsageError(f"--mask-ratios {args.mask_ratios!r}: expected numbers like 0.5,0.75,0.9") from None
    if not all(0 < r < 1 for r in ratios):
        raise UsageError(f"--mask-ratios {args.mask_ratios}: each must be in (0, 1)")
    args.checkpoint = find_checkpoint(args.checkpoint)
    method, config = load_checkpoint(args.checkpoint)
    if "reconstruct" not in method.capabilities:
        raise UsageError(f"--checkpoint {args.checkpoint}: a {config.method} checkpoint; viz mae needs an MAE one")
    canvases = first_canvases(args.data, args.images, config.data.canvas_size)
    picture = mae_picture(method, canvases, ratios, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    picture.save(args.out)
    return {"out": args.out, "images": len(canvases), "mask_ratios": ratios}


def cmd_viz_attention(args) -> dict:
    from pipelines.images.decode import BadImage, decode_canvas
    from pipelines.outputs.viz import attention_picture
    from pipelines.weights.checkpoint import find_checkpoint, load_checkpoint

    args.checkpoint = find_checkpoint(args.checkpoint)
    method, config = load_checkpoint(args.checkpoint)
    if "attention" not in method.capabilities or not hasattr(method.encoder(), "blocks"):
        from methods import METHODS

        showing = ", ".join(sorted(name for name, cls in METHODS.items() if "attention" in cls.capabilities))
        raise UsageError(f"--checkpoint {args.checkpoint}: a {config.method} checkpoint with backbone "
                         f"{config.backbone.name}; viz attention needs a checkpoint of a method that "
                         f"shows attention ({showing}) with a ViT backbone")
    patch = method.encoder().patch_embed.patch_size[0]
    size = args.size or method.eval_size
    if size % patch:
        raise UsageError(f"--size {size}: must be a multiple of the ViT's patch size {patch}")
    try:
        with open(args.image, "rb") as stream:
            image = decode_canvas(stream.read(), max(size, config.data.canvas_size))
    except OSError as error:
        raise UsageError(f"--image {args.image}: {error.strerror}") from None
    except BadImage as error:
        raise UsageError(f"--image {args.image}: {error}") from None
    picture = attention_picture(method, image, size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    picture.save(args.out)
    return {"out": args.out, "heads": method.encoder().blocks[-1].attn.num_heads, "size": size}


def cmd_viz_curves(args) -> dict:
    from pipelines.outputs.viz import curves_picture
    from pipelines.train.tracking import METRICS_FILE, read_history

    try:
        history = read_history(args.run_folder)
    except OSError as error:
        raise UsageError(f"--run {args.run_folder}: cannot read ({error})") from None
    if not history:
        raise UsageError(f"--run {args.run_folder}: no {METRICS_FILE} with reports (expected a selfsup run folder)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    panels = curves_picture(history, args.out, title=args.run_folder.rstrip("/").split("/")[-1])
    return {"out": args.out, "reports": len(history), "last_step": history[-1]["step"], "panels": panels}


def cmd_export(args) -> dict:
    from pipelines.outputs.export import export_encoder
    from pipelines.weights.checkpoint import find_checkpoint

    args.checkpoint = find_checkpoint(args.checkpoint)
    result = export_encoder(args.checkpoint, args.out, overwrite=args.overwrite, onnx=args.format == "onnx")
    log.info(f"export: load it with: {result['load']}")
    return result


def cmd_embed(args) -> dict:
    from pipelines.images.shards import check_output_folder
    from pipelines.outputs.embed import embed, embeddable_shards
    from pipelines.weights.checkpoint import find_checkpoint

    args.checkpoint = find_checkpoint(args.checkpoint)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.actors is not None and args.actors < 1:
        raise UsageError(f"--actors {args.actors}: must be >= 1")
    shards = embeddable_shards(args.data)  # no ids: refused before Ray starts
    check_output_folder(args.out, args.overwrite)
    start_ray(args.num_cpus)
    return embed(args.checkpoint, args.data, args.out, batch_size=args.batch_size, actors=args.actors,
                 gpus_per_actor=args.gpus_per_actor, precision=args.precision, overwrite=args.overwrite,
                 shards=shards, with_thumbnails=args.thumbnails)


def cmd_curate(args) -> dict:
    from pipelines.curate.curate import SHARDS, CurateOptions, curate, earlier_curate, given_embeddings
    from pipelines.images.shards import absolute_location, check_output_folder
    from pipelines.outputs.embed import embeddable_shards
    from pipelines.weights.checkpoint import find_checkpoint, load_checkpoint
    from pipelines.weights.init_from import method_from_weights

    try:
        levels = tuple(int(count) for count in args.clusters.split(","))
    except ValueError:
        raise UsageError(f"--clusters {args.clusters}: comma-separated counts, first level to top (e.g. 100,10)"
                         ) from None
    try:
        match = None if args.match == "off" else float(args.match)
    except ValueError:
        raise UsageError(f"--match {args.match}: a correlation in (0, 1], or 'off'") from None
    options = CurateOptions(threshold=args.threshold, match=match, candidates=args.candidates, clusters=levels,
                            target=args.target, seed=args.seed, partition_rows=args.partition_rows,
                            probes=args.probes)
    data, out = absolute_location(args.data.rstrip("/")), absolute_location(args.out.rstrip("/"))
    if data == out or data.startswith(out + "/") or out.startswith(data + "/"):
        raise UsageError(f"--out {args.out}: must be outside --data {args.data} (and not hold it)")
    shards = embeddable_shards(data)  # no ids: refused before Ray starts
    options.check(shards.num_rows)
    embeddings, encoder = None, None
    if args.embeddings:
        embeddings = given_embeddings(args.embeddings, shards, need_thumbnails=match is not None)
    elif args.checkpoint:
        args.checkpoint = find_checkpoint(args.checkpoint)
        load_checkpoint(args.checkpoint)  # a checkpoint whose weights do not build its encoder: refused here
    else:  # weights that do not fit the method's backbone: refused here, naming the first misfit
        config = init_from_config(args)
        encoder, args.checkpoint = (method_from_weights(config), config), args.init_from
    if not earlier_curate(out):  # a rerun reuses and replaces its own output
        check_output_folder(f"{out}/{SHARDS}", args.overwrite)
    start_ray(args.num_cpus)
    return curate(shards, out, options, checkpoint=args.checkpoint, embeddings=embeddings, batch_size=args.batch_size,
                  encoder=encoder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_prepare_parser, _viz_parsers, _pretrain_parser, _tune_parser, _eval_parser, _finetune_parser,
                _export_parser, _embed_parser, _curate_parser, _demo_parser):
        add(commands)
    return parser


def _prepare_parser(commands) -> None:
    prepare = commands.add_parser("prepare", help="write Parquet image shards from a folder, a Parquet or sample:NAME")
    prepare.add_argument("src", help="image folder (subfolders = classes), image Parquet, or sample:"
                         + "|sample:".join(SAMPLES))
    prepare.add_argument("--out", required=True, help="output folder or URI")
    prepare.add_argument("--shard-mb", type=float, default=256.0, help="target shard size (MB)")
    prepare.add_argument("--row-group-mb", type=float, default=8.0, help="target row-group size (MB)")
    prepare.add_argument("--max-bad-fraction", type=float, default=0.5, help="fail above this fraction of bad images")
    prepare.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    prepare.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                         help="image folders: hold out F of every class as OUT/test, the rest OUT/train "
                              "(deterministic, by record id)")
    prepare.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    prepare.set_defaults(run=cmd_prepare)


def _viz_parsers(commands) -> None:
    viz = commands.add_parser("viz", help="draw pictures").add_subparsers(dest="picture", required=True)
    augment = viz.add_parser("augment", help="originals beside their augmented views")
    augment.add_argument("--data", required=True, help="shard folder or URI")
    augment.add_argument("--method", required=True, help=METHOD_HELP)
    augment.add_argument("--out", required=True, help="PNG file to write")
    augment.add_argument("--images", type=int, default=6)
    augment.add_argument("--canvas-size", type=int, default=64)
    augment.add_argument("--seed", type=int, default=0)
    augment.add_argument("--set", action="append", default=[], metavar="VIEW.FIELD=VALUE", help="recipe override")
    augment.set_defaults(run=cmd_viz_augment)
    mae = viz.add_parser("mae", help="MAE reconstructions at several mask ratios")
    mae.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    mae.add_argument("--data", required=True, help="shard folder or URI")
    mae.add_argument("--mask-ratios", default="0.5,0.75,0.9")
    mae.add_argument("--out", required=True, help="PNG file to write")
    mae.add_argument("--images", type=int, default=6)
    mae.add_argument("--seed", type=int, default=0)
    mae.set_defaults(run=cmd_viz_mae)
    attention = viz.add_parser("attention", help="DINO: the last block's class-token attention per head")
    attention.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    attention.add_argument("--image", required=True, help="an image file (any format Pillow reads)")
    attention.add_argument("--out", required=True, help="PNG file to write")
    attention.add_argument("--size", type=int, default=None,
                           help="input size the ViT sees (default: its training view size)")
    attention.set_defaults(run=cmd_viz_attention)
    curves = viz.add_parser("curves", help="loss, LR, kNN and collapse indicators over a run's steps")
    curves.add_argument("--run", dest="run_folder", required=True, help="a run folder (storage/name, local or URI)")
    curves.add_argument("--out", required=True, help="PNG file to write")
    curves.set_defaults(run=cmd_viz_curves)


def _pretrain_parser(commands) -> None:
    pretrain = commands.add_parser("pretrain", help="self-supervised pretraining on Ray Train")
    _method_args(pretrain)
    pretrain.add_argument("--data", required=True, help="training images: " + SHARDS_HELP)
    pretrain.add_argument("--val", help="labeled shards for online kNN")
    pretrain.add_argument("--probe", help=PROBE_HELP)
    pretrain.add_argument("--workers", default=None, metavar="N|MIN:MAX", type=lambda v: int(v) if v.isdigit() else v,
                          help="training workers; MIN:MAX runs elastically (default: train.workers, 1)")
    pretrain.add_argument("--gpus-per-worker", type=float, default=0)
    pretrain.add_argument("--storage", help="folder or URI that holds run folders (default ./runs); the run is "
                                            "STORAGE/NAME, which --checkpoint takes")
    pretrain.add_argument("--name", help="run name; a run under --storage with this name is resumed when it was "
                                         "interrupted, returned when it is complete, and refused when this command's "
                                         "settings differ from its own (unless --resume)")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue the run named --name with this command's settings (e.g. more optim.epochs)")
    pretrain.add_argument("--init-from", metavar="PATH",
                          help="start the encoder from these weights: a `selfsup export` or timm model folder, "
                               "or a .safetensors/.pth file (continued pretraining)")
    pretrain.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    pretrain.set_defaults(run=cmd_pretrain)


def _tune_parser(commands) -> None:
    search = commands.add_parser("tune", help="hyperparameter search over pretraining runs (Ray Tune)")
    _method_args(search)
    search.add_argument("--data", required=True, help="training images: " + SHARDS_HELP)
    search.add_argument("--val", help="labeled shards: the objective's online kNN")
    search.add_argument("--probe", help=PROBE_HELP)
    search.add_argument("--space", action="append", default=[], metavar="NAME=DIST(ARGS)",
                        help="e.g. 'temperature=loguniform(0.05,1)', 'batch_size=choice(128,256,512)' "
                             "(default: the method's space)")
    search.add_argument("--samples", type=int, default=8, help="trials to draw")
    search.add_argument("--workers-per-trial", type=int, default=1)
    search.add_argument("--gpus-per-worker", type=float, default=0)
    search.add_argument("--scheduler", default="asha", choices=["asha", "fifo"])
    search.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: what the CPUs allow, one CPU per trial left for decoding)")
    search.add_argument("--metric", default="", help="objective: any reported metric (default: knn_top1 with --val, "
                                                      "else the method's label-free objective)")
    search.add_argument("--mode", default="", choices=["max", "min"],
                        help="default: the default objective's (max for a metric given with --metric)")
    search.add_argument("--grace-epochs", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    search.add_argument("--storage", help="folder or URI for the search (default ./runs)")
    search.add_argument("--name", help="search name; a search that exists under --storage is resumed")
    search.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    search.set_defaults(run=cmd_tune)


def _eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="kNN or linear probe of a checkpoint's frozen encoder")
    evaluate.add_argument("protocol", choices=["knn", "linear"])
    evaluate.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    evaluate.add_argument("--train", required=True, help="labeled shards the kNN bank / probe trains on")
    evaluate.add_argument("--test", required=True, help="labeled shards to score")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the random-init and raw-pixel floors")
    evaluate.add_argument("--num-cpus", type=int, default=None)
    evaluate.set_defaults(run=cmd_eval)


def _finetune_parser(commands) -> None:
    tune = commands.add_parser("finetune", help="fine-tune an encoder with a linear head on labels, beside scratch")
    tune.add_argument("--checkpoint", help="a pretraining run's checkpoint (or its run folder)")
    tune.add_argument("--init-from", metavar="PATH", help="or encoder weights: a `selfsup export` or timm folder, "
                                                          ".safetensors or .pth (with --method)")
    tune.add_argument("--method", help="with --init-from: the method whose architecture the weights have")
    tune.add_argument("--method-preset", default=None, help="with --init-from: that method's preset")
    tune.add_argument("--data", required=True, help="labeled training shards")
    tune.add_argument("--test", required=True, help="labeled shards to score top-1 on")
    few = tune.add_mutually_exclusive_group()
    few.add_argument("--labels-per-class", type=int, default=None, metavar="N",
                     help="train on N images per class, chosen by the CRC-32 of their ids (default: all)")
    few.add_argument("--label-fraction", type=float, default=None, metavar="F",
                     help="train on this fraction of each class, chosen the same way")
    tune.add_argument("--preset", default=None, help="fine-tuning recipe: vit, resnet, vit-small-images, "
                                                     "resnet-small-images (default: the encoder's family and size)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override optim.*, train.*, data.* or finetune.* (e.g. optim.epochs=30)")
    tune.add_argument("--no-scratch", action="store_true", help="skip the same recipe from random init")
    tune.add_argument("--out", help="write the fine-tuned classifier here as a timm model folder")
    tune.add_argument("--overwrite", action="store_true")
    tune.add_argument("--workers", type=int, default=None)
    tune.add_argument("--gpus-per-worker", type=float, default=0)
    tune.add_argument("--storage", help="run folder or URI for checkpoints (default ./runs)")
    tune.add_argument("--name", help="run name (the scratch run adds -scratch)")
    tune.add_argument("--num-cpus", type=int, default=None)
    tune.set_defaults(run=cmd_finetune)


def _export_parser(commands) -> None:
    export = commands.add_parser("export", help="a checkpoint's encoder as timm-loadable safetensors + config.json")
    export.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    export.add_argument("--out", required=True, help="folder to write model.safetensors and config.json to")
    export.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    export.add_argument("--format", default="timm", choices=["timm", "onnx"],
                        help="timm (default): a timm model folder; onnx: the same plus encoder.onnx, checked with "
                             "onnxruntime (pip install 'selfsup[onnx]')")
    export.set_defaults(run=cmd_export)


def _embed_parser(commands) -> None:
    embedding = commands.add_parser("embed", help="embeddings of every image in shards, as Parquet (Ray Data)")
    embedding.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    embedding.add_argument("--data", required=True, help=SHARDS_HELP)
    embedding.add_argument("--out", required=True, help="folder or URI for the embedding Parquet files")
    embedding.add_argument("--batch-size", type=int, default=256)
    embedding.add_argument("--actors", type=int, default=None,
                           help="most model-holding actors (default: one per GPU, else CPUs / 2)")
    embedding.add_argument("--gpus-per-actor", type=float, default=None,
                           help="default 1 when the cluster has GPUs, else 0")
    embedding.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    embedding.add_argument("--overwrite", action="store_true", help="replace Parquet files already in --out")
    embedding.add_argument("--thumbnails", action="store_true",
                           help="also write each image's 32x32 grey thumbnail (for `selfsup curate --embeddings`)")
    embedding.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    embedding.set_defaults(run=cmd_embed)


def _curate_parser(commands) -> None:
    curating = commands.add_parser("curate", help="remove duplicates and balance concepts: curated shards and a report")
    curating.add_argument("--data", required=True, help=SHARDS_HELP)
    encoder = curating.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--checkpoint", help=f"the encoder that embeds the images: {CHECKPOINT_HELP}")
    encoder.add_argument("--init-from", help="weights of the encoder (a timm or `selfsup export` folder, or a file), "
                         "with --method (and --method-preset) naming its architecture")
    encoder.add_argument("--embeddings", help="the images' embeddings already written by `selfsup embed`")
    curating.add_argument("--method", help="with --init-from: the method whose backbone the weights fit")
    curating.add_argument("--method-preset", default=None, help="with --init-from: that method's preset")
    curating.add_argument("--out", required=True, help="folder or URI: curated shards in OUT/shards, the report, "
                          "duplicate groups and clusters in OUT/curation (a rerun reuses what it finished)")
    curating.add_argument("--threshold", type=float, default=0.9,
                          help="cosine similarity from which two images are near-duplicate candidates (default 0.9)")
    curating.add_argument("--match", default="0.93",
                          help="pixel match (the best correlation of a crop of one image with the other) from which "
                          "a candidate is a near-duplicate; 'off': the cosine alone decides (default 0.93)")
    curating.add_argument("--candidates", type=int, default=10,
                          help="with --match: the most candidates checked per image, its nearest (default 10)")
    curating.add_argument("--clusters", default="100,10",
                          help="k-means clusters per level, first level (over images) to top (default 100,10)")
    curating.add_argument("--target", type=int, default=None,
                          help="images to keep, sampled evenly over the top-level clusters (default: all left "
                          "after removing duplicates)")
    curating.add_argument("--seed", type=int, default=0, help="k-means and sampling seed")
    curating.add_argument("--partition-rows", type=int, default=25_000,
                          help="rows per near-duplicate search task (bounds its memory; default 25000)")
    curating.add_argument("--probes", type=int, default=2, help="partitions each image is searched in (default 2)")
    curating.add_argument("--batch-size", type=int, default=256, help="images per model call when embedding")
    curating.add_argument("--overwrite", action="store_true", help="replace Parquet files already in OUT/shards")
    curating.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    curating.set_defaults(run=cmd_curate)


def _demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="the main job on the bundled sample, end to end, on a laptop")
    demo.add_argument("--sample", default="mnist-m", choices=list(SAMPLES),
                      help="mnist-m (default: digits on photo crops, where raw pixels are weak), mnist or digits")
    demo.add_argument("--workdir", default="selfsup-demo", help="where data and pictures go")
    demo.add_argument("--epochs", type=int, default=None, help="SimCLR epochs on the sample (default: the "
                      "`demo` preset's)")
    demo.add_argument("--num-cpus", type=int, default=None)
    demo.set_defaults(run=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    global _stdout
    args = build_parser().parse_args(argv)
    quiet_console()
    # stdout holds the JSON line only: Ray prints its raylets' warnings on the driver's stdout
    # whatever log_to_driver says, and any library may print; while the command runs, all of
    # that goes to stderr.
    _stdout, sys.stdout = sys.stdout, stdout_while_running()
    try:
        return _run(args)
    finally:
        sys.stdout.flush()
        sys.stdout = _stdout


def _run(args) -> int:
    # A line at once: loading PyTorch and Ray (the method registry imports them: about 6 s on a
    # busy 2-core machine) and checking the inputs take seconds before the command's own first
    # line. On a terminal the next line replaces it.
    log.info(f"{args.command}: loading PyTorch and Ray, then checking the inputs", extra={"transient": True})
    from methods.versions import UntestedVersion

    try:
        try:
            result = args.run(args)
        finally:
            end_transient()  # an error line or the JSON line starts on a clean line
        emit(result)
    except (UsageError, DataError, UntestedVersion) as error:
        print(f"selfsup {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as error:  # one line; a second Ctrl-C now exits at once
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        print(f"selfsup {args.command}: {error}", file=sys.stderr)
        return 130
    except NonFiniteLossError as error:  # a clean stop, not a crash: no traceback
        print(f"selfsup {args.command}: error: training stopped: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if not _training_failed(error):
            raise
        # Ray's message carries every worker's traceback; the user first needs the cause.
        print(f"selfsup {args.command}: error: training failed: {_root_cause(error)}", file=sys.stderr)
        return 1
    return 0


def _training_failed(error: Exception) -> bool:
    """Ray Train's error for a run whose workers or controller failed (only a command that ran
    one has imported Ray Train)."""
    if "ray.train" not in sys.modules:
        return False
    from ray.train import TrainingFailedError

    return isinstance(error, TrainingFailedError)


def _root_cause(error: BaseException) -> str:
    """The last line of the deepest error message: e.g. 'NonFiniteLossError: loss is nan at step 12 ...'."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors or lines or [type(error).__name__])[-1]


def script() -> None:
    """The `selfsup` command (and `python -m pipelines.cli`): `main`, then stdout stays off limits
    until the process ends. Ray's shutdown at exit can still print its raylets' warnings on the
    driver's stdout, after `main` has handed stdout back (an interrupted run's stdout once held one:
    docs/BENCHMARKS.md, "Each run's Ray processes")."""
    code = main()
    sys.stdout = stdout_while_running()
    sys.exit(code)


if __name__ == "__main__":
    script()
