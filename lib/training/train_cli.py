"""Command line shared by train_unet.py and train_fcn.py (NIST's flags kept as users type them).

Nothing heavy is imported here: TensorFlow is loaded only after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# Default learning rate (NIST: 1e-4), with 20 warm-up steps. On 2 CPU cores, 1e-3 with 128-px
# patches took the default UNet from 0.768 to 0.924 pooled foreground IoU on the NIST
# held-back images in 25 minutes (3e-4 on whole 256-px tiles before; benchmarks/bench_accuracy.py)
# and instance models from F1 0.761 to 0.885 in 15 (benchmarks/bench_instance_accuracy.py).
DEFAULT_LEARNING_RATE = 1e-3
# UNet filters at the first level for --target instance unless --model_options names them: 32
# filters made 2273 steps in 15 minutes on 2 cores (64: about 600) and F1 0.90 at IoU 0.5 on
# held-back touching cells where 64 reached 0.885.
INSTANCE_UNET_FILTERS = 32


def _auto_or_bool(text: str) -> bool | None:
    from ..common.cli import flag_bool

    return None if str(text).strip().lower() == "auto" else flag_bool(text)


def build_parser(prog: str, description: str, architectures: dict[str, str], default_architecture: str,
                 architecture_flag: str) -> argparse.ArgumentParser:
    """The parser of a training CLI. ``architectures`` maps the CLI's choice to the registry name."""
    from ..common.cli import flag_bool
    from ..reader.augment import add_augmentation_arguments
    from ..reader.imagereader import add_reader_arguments
    from .losses import LOSSES
    from .trainer import LR_SCHEDULES

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("input")
    data.add_argument("--train_database", required=True, help="train-NAME.lmdb written by build_lmdb.py")
    data.add_argument("--test_database", required=True, help="test-NAME.lmdb written by build_lmdb.py")
    data.add_argument("--number_classes", type=int, default=None,
                      help="number of classes the model predicts (required for --target semantic; an instance "
                           "model's database has 2: background and object)")
    data.add_argument("--patch_size", type=int, default=None,
                      help="training patch edge (random crops of the stored tiles); default: 128 px of larger "
                           "tiles (more steps per minute), else the tile size")
    model = parser.add_argument_group("model")
    model.add_argument(architecture_flag, dest="architecture", choices=sorted(architectures),
                       default=default_architecture, help="network architecture")
    model.add_argument("--model_options", default="{}",
                       help='JSON object of builder options, e.g. \'{"base_filters": 16, "depth": 3}\' '
                            f'(--target instance with the UNet: base_filters {INSTANCE_UNET_FILTERS} unless given)')
    inst = parser.add_argument_group("instance segmentation (--target instance)")
    inst.add_argument("--target", choices=("semantic", "instance"), default="semantic",
                      help="semantic: one class per pixel; instance: per-pixel channels from instance labels "
                           "(database built with --mask_type instance), grown into objects by watershed at inference")
    inst.add_argument("--instance_channels", default="F,C,Db",
                      help="output channels, in order: F foreground, C contour, Db distance to the boundary, "
                           "P centre points, T touching areas")
    inst.add_argument("--instance_weights", default=None,
                      help="loss weight per channel, e.g. '1,1,0.5' (default all 1)")
    inst.add_argument("--contour_mode", choices=("thick", "inner", "outer"), default="thick",
                      help="contour channel C as skimage.segmentation.find_boundaries' modes")
    inst.add_argument("--point_radius", type=int, default=3, help="radius (px) of the centre-point disks of P")
    inst.add_argument("--touch_width", type=int, default=2, help="width (px) of the touching areas T")
    inst.add_argument("--distance_loss", choices=("l1", "mse"), default="l1", help="loss of distance channels")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=8, help="examples per replica (global batch = this x replicas)")
    optim.add_argument("--learning_rate", type=float, default=DEFAULT_LEARNING_RATE,
                       help="AdamW learning rate (NIST used 1e-4)")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW decoupled weight decay (kernels only)")
    optim.add_argument("--loss", choices=LOSSES, default="ce",
                       help="ce, class-frequency weighted ce, soft dice, or ce + dice")
    optim.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                       help="after warm-up: constant, halve on plateau (3 evaluations), cosine or one-cycle "
                            "(cosine and one-cycle need --max_steps)")
    optim.add_argument("--warmup_steps", type=int, default=20, help="linear learning-rate warm-up steps")
    optim.add_argument("--seed", type=int, default=0, help="seed of weights and sampling")
    run = parser.add_argument_group("schedule and runtime")
    run.add_argument("--test_every_n_steps", type=int, default=1000, help="steps between evaluations")
    run.add_argument("--early_stopping", type=int, default=10,
                     help="stop after this many evaluations without test-loss improvement (1e-4 tolerance)")
    run.add_argument("--max_steps", type=int, default=None, help="stop after this many steps")
    run.add_argument("--max_minutes", type=float, default=None,
                     help="stop cleanly (best model exported) after this many minutes, e.g. before a wall time")
    run.add_argument("--mixed_precision", type=_auto_or_bool, nargs="?", const=True, default=None,
                     help="bfloat16 compute with float32 weights: 1, 0, or auto (default: on where the GPU or "
                          "CPU computes bfloat16 natively)")
    run.add_argument("--jit_compile", type=flag_bool, nargs="?", const=True, default=False,
                     help="compile the forward/backward pass with XLA")
    run.add_argument("--folds", type=int, default=0,
                     help="k-fold ensemble: train min(K, source images) models, model i validating on fold i of "
                          "the training database, into OUTPUT/ensemble/ (0 = one model)")
    run.add_argument("--use_augmentation", type=flag_bool, nargs="?", const=True, default=True,
                     help="augment training examples (1/0)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True, help="model folder; rerunning the same command resumes it")
    add_reader_arguments(parser)
    add_augmentation_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, architectures: dict[str, str]):
    """A validated TrainConfig from parsed flags; misuse exits through ``parser.error`` (code 2)."""
    from ..common.settings import ConfigError
    from ..reader.augment import augment_params_from_args
    from ..reader.imagereader import reader_options_from_args
    from .trainer import TrainConfig

    try:
        options = json.loads(args.model_options)
        if not isinstance(options, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error(f"--model_options must be a JSON object; got {args.model_options!r} ({exc})")
    if args.target == "instance" and architectures[args.architecture] == "unet" and "base_filters" not in options:
        options["base_filters"] = INSTANCE_UNET_FILTERS
    if args.number_classes is None:
        if args.target == "semantic":
            parser.error("--number_classes is required for --target semantic")
        args.number_classes = 2
    reader = reader_options_from_args(args, parser)
    augmentation = dataclasses.asdict(augment_params_from_args(args, parser))
    config = TrainConfig(
        train_database=args.train_database, test_database=args.test_database, output_dir=args.output_dir,
        number_classes=args.number_classes, architecture=architectures[args.architecture], model_options=options,
        batch_size=args.batch_size, patch_size=args.patch_size, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, loss=args.loss, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        test_every_n_steps=args.test_every_n_steps, early_stopping=args.early_stopping, max_steps=args.max_steps,
        max_minutes=args.max_minutes, use_augmentation=args.use_augmentation and not args.no_augmentation,
        augmentation=augmentation, sampling=reader["sampling"], normalization=reader["normalization"],
        reader_count=reader["reader_count"], seed=args.seed, mixed_precision=args.mixed_precision,
        jit_compile=args.jit_compile, folds=args.folds, fold=0 if args.folds else None, target=args.target,
        instance_channels=args.instance_channels, instance_weights=args.instance_weights,
        instance_options={"contour_mode": args.contour_mode, "point_radius": args.point_radius,
                          "touch_width": args.touch_width, "distance_loss": args.distance_loss})
    try:
        return config.validate()
    except ConfigError as exc:
        parser.error("\n".join(exc.violations))


def run(argv: list[str] | None, prog: str, description: str, architectures: dict[str, str],
        default_architecture: str, architecture_flag: str) -> int:
    """Parse, validate, train; return the exit code (2 bad input, 130/143 interrupted, 1 training failure)."""
    parser = build_parser(prog, description, architectures, default_architecture, architecture_flag)
    args = parser.parse_args(argv)
    # TensorFlow's C++ start-up chatter (CUDA probing on CPU nodes, CPU features) buries the
    # settings and progress lines in batch logs; errors still show. A user's setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    config = config_from_args(args, parser, architectures)
    print("settings: " + json.dumps(config.to_dict()), flush=True)

    from .trainer import TrainingError, TrainingInterrupted, train, train_kfold

    if args.save_aug_samples:
        from ..reader.augment import AugmentParams
        from ..reader.imagereader import save_augmentation_samples

        params = AugmentParams(**config.augmentation) if config.use_augmentation else AugmentParams.none()
        paths = save_augmentation_samples(config.train_database, args.save_aug_samples, params=params,
                                          seed=config.seed, patch_shape=(config.patch_size,) * 2
                                          if config.patch_size else None)
        print(f"wrote {len(paths)} augmentation samples to {args.save_aug_samples}")
    try:
        log = lambda m: print(m, flush=True)  # noqa: E731
        train_kfold(config, log=log) if config.folds else train(config, log=log)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "step" not in str(exc) else 1
    return 0
