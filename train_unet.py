#!/usr/bin/env python3
"""Train a UNet or FC-DenseNet segmentation model on LMDB databases written by build_lmdb.py.

    python train_unet.py --train_database db/train-cells.lmdb --test_database db/test-cells.lmdb \
        --output_dir runs/cells --number_classes 2

Rerunning the same command after the job was stopped or killed resumes from the last checkpoint;
rerunning a finished run with a larger --max_steps or --max_minutes (a training budget counted
over every invocation) extends it.
Exit codes: 0 done; 1 the training loss became non-finite; 2 bad settings or data, nothing
trained; 3 stopped by a signal (SIGTERM, SIGINT, SIGUSR1: pre-emption, wall time) with a
checkpoint written: rerun the same command to continue.

This module also holds the command line shared with train_fcn.py (NIST's flags kept as users
type them). Every flag's default is read from lib.training.TrainConfig, so the command line and
the Python API train the same model. TensorFlow is loaded only after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lib.common.cli import flag_bool, make_parser, run_main, settings_table
from lib.common.device import check_allocated_gpus, device_line, quiet_tensorflow_logs
from lib.common.settings import ConfigError
from lib.reader.augment import AugmentParams
from lib.reader.batches import NORMALIZATIONS, SAMPLINGS
from lib.training.config import INSTANCE_UNET_FILTERS, LR_SCHEDULES, TARGETS, TrainConfig, default_of
from lib.training.losses import LOSSES

ARCHITECTURES = {"unet": "unet", "fc-densenet56": "fc-densenet56", "fc-densenet67": "fc-densenet67",
                 "fc-densenet103": "fc-densenet103"}


def _auto_or_bool(text: str) -> bool | str | None:
    word = str(text).strip().lower()
    if word in ("bfloat16", "float16", "float32"):
        return word
    return None if word == "auto" else flag_bool(text)


# Reader and augmentation flags


def add_reader_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the reader flags of the training CLIs."""
    group = parser.add_argument_group("input pipeline")
    group.add_argument("--reader_count", type=int, default=default_of("reader_count"),
                       help="reader worker processes (0: in the main process, for debugging)")
    group.add_argument("--sampling", choices=SAMPLINGS, default=default_of("sampling"),
                       help="uniform over tiles; balanced: a class uniformly, then a tile holding it; "
                            "foreground: crop centres weighted by inverse class frequency")
    group.add_argument("--balance_classes", type=flag_bool, nargs="?", const=True, default=False,
                       help="same as --sampling balanced (NIST's flag: --balance_classes 1)")
    group.add_argument("--normalization", choices=NORMALIZATIONS, default=default_of("normalization"),
                       help="dataset: z-score with the training database's statistics; tile: with each "
                            "patch's own; percentile: (x - low) / (high - low) with each image's own percentiles")
    group.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       default=default_of("percentiles"), help="the percentiles of --normalization percentile")
    group.add_argument("--save_aug_samples", metavar="DIR", default=None,
                       help="write a few augmented image/label pictures to DIR before training")
    return group


def reader_options_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """The reader settings (TrainConfig fields) from the flags of :func:`add_reader_arguments`.

    Invalid values go to ``parser.error`` (exit 2) if given, else raise ``ValueError``.
    """
    problems = []
    if args.reader_count < 0:
        problems.append(f"--reader_count must be >= 0; got {args.reader_count}")
    if args.balance_classes and args.sampling not in ("uniform", "balanced"):
        problems.append(f"--balance_classes must not be combined with --sampling {args.sampling}")
    if problems:
        message = "; ".join(problems)
        if parser is not None:
            parser.error(message)
        raise ValueError(message)
    return {"reader_count": args.reader_count, "normalization": args.normalization,
            "sampling": "balanced" if args.balance_classes else args.sampling}


def add_augmentation_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the augmentation flags (NIST's names and defaults) to a training CLI's parser."""
    defaults = AugmentParams(**default_of("augmentation"))
    group = parser.add_argument_group("augmentation")
    group.add_argument("--no_augmentation", action="store_true",
                       help="switch every augmentation off (the patch is still randomly cropped)")
    group.add_argument("--no_reflection", action="store_true", help="no random reflections in x and y")
    group.add_argument("--no_rotation", action="store_true", help="no random rotation in [0, 360) degrees")
    group.add_argument("--jitter_augmentation_severity", type=float, default=defaults.jitter,
                       help="random translation, fraction of the field of view")
    group.add_argument("--scale_augmentation_severity", type=float, default=defaults.scale,
                       help="random anisotropic scale change, fraction of the size")
    group.add_argument("--noise_augmentation_severity", type=float, default=defaults.noise,
                       help="additive Gaussian noise, fraction of each channel's dynamic range")
    group.add_argument("--blur_augmentation_max_sigma", type=float, default=defaults.blur_max_sigma,
                       help="maximum Gaussian blur sigma in pixels (half of the samples are not blurred)")
    group.add_argument("--intensity_augmentation_severity", type=float, default=defaults.intensity,
                       help="random intensity shift, fraction of each channel's dynamic range")
    return group


def augment_params_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> AugmentParams:
    """Build :class:`AugmentParams` from parsed flags; invalid values go to ``parser.error`` (exit 2) if given.

    Raises ``ValueError`` listing every invalid value when no parser is given.
    """
    if args.no_augmentation:
        return AugmentParams.none()
    try:
        return AugmentParams(reflection=not args.no_reflection, rotation=not args.no_rotation,
                             jitter=args.jitter_augmentation_severity, scale=args.scale_augmentation_severity,
                             noise=args.noise_augmentation_severity, blur_max_sigma=args.blur_augmentation_max_sigma,
                             intensity=args.intensity_augmentation_severity)
    except ValueError as exc:
        if parser is None:
            raise
        parser.error(str(exc))
        raise  # parser.error exits; this line only satisfies type checkers


# The training command line


def build_parser(prog: str, description: str, architectures: dict[str, str], default_architecture: str,
                 architecture_flag: str) -> argparse.ArgumentParser:
    """The parser of a training CLI. ``architectures`` maps the CLI's choice to the registry name."""
    instance_defaults = default_of("instance_options")
    parser = make_parser(description, prog=prog)
    data = parser.add_argument_group("input")
    data.add_argument("--train_database", required=True, help="train-NAME.lmdb written by build_lmdb.py")
    data.add_argument("--test_database", required=True, help="test-NAME.lmdb written by build_lmdb.py")
    data.add_argument("--number_classes", type=int, default=None,
                      help="number of classes the model predicts (required for --target semantic; an instance "
                           "model's database has 2: background and object)")
    data.add_argument("--patch_size", type=int, default=default_of("patch_size"),
                      help="training patch edge (random crops of the stored tiles); default: 128 px of larger "
                           "tiles (more steps per minute), else the tile size")
    model = parser.add_argument_group("model")
    model.add_argument(architecture_flag, dest="architecture", choices=sorted(architectures),
                       default=default_architecture, help="network architecture")
    model.add_argument("--model_options", default="{}",
                       help='JSON object of builder options, e.g. \'{"base_filters": 16, "depth": 3}\' '
                            f'(--target instance with the UNet: base_filters {INSTANCE_UNET_FILTERS} unless given)')
    inst = parser.add_argument_group("instance segmentation (--target instance)")
    inst.add_argument("--target", choices=TARGETS, default=default_of("target"),
                      help="semantic: one class per pixel; instance: per-pixel channels from instance labels "
                           "(database built with --mask_type instance), grown into objects by watershed at inference")
    inst.add_argument("--instance_channels", default=default_of("instance_channels"),
                      help="output channels, in order: F foreground, C contour, Db distance to the boundary, "
                           "P centre points, T touching areas, R StarDist rays, H,V HoVer-Net offsets, D signed "
                           "distance, Dc distance to the centre, Dn closeness to neighbours, B background, A "
                           "affinities (docs/instances.md: which sets work)")
    inst.add_argument("--instance_weights", default=default_of("instance_weights"),
                      help="loss weight per channel, e.g. '1,1,0.5' (default all 1)")
    inst.add_argument("--contour_mode", choices=("thick", "inner", "outer"), default=instance_defaults["contour_mode"],
                      help="contour channel C as skimage.segmentation.find_boundaries' modes")
    inst.add_argument("--point_radius", type=int, default=instance_defaults["point_radius"],
                      help="radius (px) of the centre-point disks of P")
    inst.add_argument("--touch_width", type=int, default=instance_defaults["touch_width"],
                      help="width (px) of the touching areas T")
    inst.add_argument("--distance_loss", choices=("l1", "mse"), default=instance_defaults["distance_loss"],
                      help="loss of distance channels")
    inst.add_argument("--n_rays", type=int, default=instance_defaults["n_rays"],
                      help="R (StarDist): number of rays per pixel, evenly spaced")
    inst.add_argument("--ray_grid", type=int, default=instance_defaults["ray_grid"],
                      help="R: rays computed on every k-th row and column (StarDist's grid; 1 = every pixel)")
    inst.add_argument("--d_alpha", type=float, default=instance_defaults["d_alpha"],
                      help="D: tanh scale (px) of the signed distance inside objects")
    inst.add_argument("--d_beta", type=float, default=instance_defaults["d_beta"],
                      help="D: tanh scale (px) of the signed distance outside objects")
    inst.add_argument("--dn_scale", type=float, default=instance_defaults["dn_scale"],
                      help="Dn: distance (px) beyond which the closeness to neighbouring objects is 0")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=default_of("batch_size"),
                       help="examples per replica (global batch = this x replicas)")
    optim.add_argument("--learning_rate", type=float, default=default_of("learning_rate"),
                       help="AdamW learning rate (NIST used 1e-4)")
    optim.add_argument("--weight_decay", type=float, default=default_of("weight_decay"),
                       help="AdamW decoupled weight decay (kernels only)")
    optim.add_argument("--loss", choices=LOSSES, default=default_of("loss"),
                       help="ce, class-frequency weighted ce, soft dice, or ce + dice")
    optim.add_argument("--lr_schedule", choices=LR_SCHEDULES, default=default_of("lr_schedule"),
                       help="after warm-up: constant, halve on plateau (3 evaluations), cosine or one-cycle "
                            "(cosine and one-cycle need --max_steps)")
    optim.add_argument("--warmup_steps", type=int, default=default_of("warmup_steps"),
                       help="linear learning-rate warm-up steps")
    optim.add_argument("--seed", type=int, default=default_of("seed"), help="seed of weights and sampling")
    run = parser.add_argument_group("schedule and runtime")
    run.add_argument("--test_every_n_steps", type=int, default=default_of("test_every_n_steps"),
                     help="steps between evaluations")
    run.add_argument("--early_stopping", type=int, default=default_of("early_stopping"),
                     help="stop after this many evaluations without test-loss improvement (1e-4 tolerance)")
    run.add_argument("--max_steps", type=int, default=default_of("max_steps"), help="stop after this many steps")
    run.add_argument("--max_minutes", type=float, default=default_of("max_minutes"),
                     help="stop after this many minutes with a checkpoint and exit 3 (resumable: rerunning continues), "
                          "e.g. before a wall time")
    run.add_argument("--mixed_precision", type=_auto_or_bool, nargs="?", const=True,
                     default=default_of("mixed_precision"),
                     help="compute precision (weights stay float32): auto (bfloat16 on GPUs of compute capability "
                          ">= 8.0 and CPUs with native bfloat16, float16 with loss scaling on older GPUs, else "
                          "float32), bfloat16, float16, float32; 1: the device's half type, 0: float32")
    run.add_argument("--jit_compile", type=flag_bool, nargs="?", const=True, default=default_of("jit_compile"),
                     help="compile the forward/backward pass with XLA")
    run.add_argument("--folds", type=int, default=default_of("folds"),
                     help="k-fold ensemble: train min(K, source images) models, model i validating on fold i of "
                          "the training database, into OUTPUT/ensemble/ (0 = one model)")
    run.add_argument("--use_augmentation", type=flag_bool, nargs="?", const=True,
                     default=default_of("use_augmentation"), help="augment training examples (1/0)")
    run.add_argument("--collective_timeout", type=float, default=default_of("collective_timeout"),
                     help="multi-worker runs: seconds a collective waits for the other workers before this worker "
                          "stops (exit 3, resumable); 0 waits for ever")
    run.add_argument("--allow_cpu", action="store_true",
                     help="run on the CPU even when the job was given GPUs that TensorFlow cannot use")
    run.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines (C++ start-up notices)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True,
                     help="model folder; rerunning the same command resumes it (a larger --max_steps extends a "
                          "finished run)")
    out.add_argument("--keep_checkpoints", action="store_true",
                     help="keep checkpoint.previous/ when the run finishes (by default only checkpoint/, what "
                          "resuming or extending needs, is kept)")
    add_reader_arguments(parser)
    add_augmentation_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                     architectures: dict[str, str]) -> TrainConfig:
    """A validated TrainConfig from parsed flags; misuse exits through ``parser.error`` (code 2).

    Only maps flags: every default, including those that depend on other settings (an
    instance model's classes and UNet filters), is TrainConfig's.
    """
    try:
        options = json.loads(args.model_options)
        if not isinstance(options, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error(f"--model_options must be a JSON object; got {args.model_options!r} ({exc})")
    if args.number_classes is None and args.target == "semantic":
        parser.error("--number_classes is required for --target semantic")
    reader = reader_options_from_args(args, parser)
    augmentation = dataclasses.asdict(augment_params_from_args(args, parser))
    config = TrainConfig(
        train_database=args.train_database, test_database=args.test_database, output_dir=args.output_dir,
        number_classes=args.number_classes, architecture=architectures[args.architecture], model_options=options,
        batch_size=args.batch_size, patch_size=args.patch_size, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, loss=args.loss, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        test_every_n_steps=args.test_every_n_steps, early_stopping=args.early_stopping, max_steps=args.max_steps,
        max_minutes=args.max_minutes, use_augmentation=args.use_augmentation and not args.no_augmentation,
        augmentation=augmentation, seed=args.seed, mixed_precision=args.mixed_precision,
        jit_compile=args.jit_compile, folds=args.folds, target=args.target,
        instance_channels=args.instance_channels, instance_weights=args.instance_weights,
        instance_options={"contour_mode": args.contour_mode, "point_radius": args.point_radius,
                          "touch_width": args.touch_width, "distance_loss": args.distance_loss,
                          "n_rays": args.n_rays, "ray_grid": args.ray_grid, "d_alpha": args.d_alpha,
                          "d_beta": args.d_beta, "dn_scale": args.dn_scale},
        collective_timeout=args.collective_timeout, keep_checkpoints=args.keep_checkpoints,
        percentiles=tuple(args.percentiles), **reader)
    try:
        config = config.validate()
    except ConfigError as exc:
        parser.error("\n".join(exc.violations))
    for name in _unused_instance_options(config):
        print(f"warning: --{name} {config.instance_options[name]} changes nothing: "
              + (f"--instance_channels {config.instance_channels} has no channel it applies to"
                 if config.target == "instance" else "it applies to --target instance only"), file=sys.stderr)
    return config


def _unused_instance_options(config: TrainConfig) -> list[str]:
    from lib.reader.targets import TargetSpec, parse_instance_channels
    from lib.reader.targets_describe import unused_options

    if config.target != "instance":
        return [name for name, value in config.instance_options.items() if value != getattr(TargetSpec(), name)]
    spec = parse_instance_channels(config.instance_channels, config.instance_weights, **config.instance_options)
    return unused_options(spec, config.instance_options)


def run_training(argv: list[str] | None, prog: str, description: str, architectures: dict[str, str],
                 default_architecture: str, architecture_flag: str) -> int:
    """Parse, validate, train; return the exit code (:func:`lib.common.cli.run_main` maps errors by class)."""
    parser = build_parser(prog, description, architectures, default_architecture, architecture_flag)
    args = parser.parse_args(argv)
    quiet_tensorflow_logs(args.verbose)
    config = config_from_args(args, parser, architectures)
    print(settings_table(prog, config.to_dict(), TrainConfig(config.train_database, config.test_database,
                                                              config.output_dir).to_dict(),
                         str(Path(config.output_dir) / "train_config.json")), flush=True)
    print(device_line(), flush=True)

    def body() -> None:
        from lib.reader.samples import save_augmentation_samples
        from lib.training import train, train_kfold

        check_allocated_gpus(args.allow_cpu, prog=prog)
        if args.save_aug_samples:
            paths = save_augmentation_samples(config.train_database, args.save_aug_samples,
                                              params=config.augment_params(), seed=config.seed,
                                              patch_shape=(config.patch_size,) * 2 if config.patch_size else None)
            print(f"wrote {len(paths)} augmentation samples to {args.save_aug_samples}")
        log = lambda m: print(m, flush=True)  # noqa: E731
        train_kfold(config, log=log) if config.folds else train(config, log=log)

    return run_main(body, prog)


def main(argv: list[str] | None = None) -> int:
    return run_training(argv, "train_unet.py", __doc__.split("\n\n")[0], ARCHITECTURES, "unet", "--architecture")


if __name__ == "__main__":
    sys.exit(main())
