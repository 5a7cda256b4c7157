"""Arguments and loading shared by the commands that take two checkpoints of one architecture
(``modelfuse barrier``, ``modelfuse align``): the architecture, the dataset, the split."""

from __future__ import annotations

import argparse
from typing import Any


def add_pair_arguments(p: argparse.ArgumentParser, *, split_default: str) -> None:
    """``A B --arch --arch-option --data --data-option --split --batch-size --device``."""
    p.add_argument("checkpoint_a", metavar="A", help="first trained model (the reference)")
    p.add_argument("checkpoint_b", metavar="B", help="second trained model")
    p.add_argument(
        "--arch",
        required=True,
        metavar="NAME|MODULE:FUNCTION",
        help="architecture of both: a zoo name (mlp, cnn, ...) or a factory 'package.module:function'",
    )
    p.add_argument(
        "--arch-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option; repeatable",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="dataset name (default %(default)s; a folder of images: --data image_folder "
        "--data-option root=PATH)",
    )
    p.add_argument(
        "--data-option", action="append", default=[], metavar="KEY=VALUE", help="dataset option; repeatable"
    )
    p.add_argument(
        # modelfuse.data.splits.SPLITS, spelled out: building the parser must not import torch
        "--split", choices=("train", "val", "test"), default=split_default, help="split (default %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=512, help="batch size (default 512)")
    p.add_argument("--device", default="cpu", help="where to run the models (default cpu)")


def load_pair(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(splits, model_a, model_b)``: the dataset, and both checkpoints loaded into
    ``--arch`` built for its inputs, on ``--device`` in eval mode.

    Two checkpoints of different architectures are refused naming the first differing
    tensor; so is a split whose batches the model cannot run.
    """
    from pathlib import Path

    from modelfuse import data as mf_data
    from modelfuse.align.matching import check_same_architecture
    from modelfuse.cli._args import key_values
    from modelfuse.errors import AlignmentError, CheckpointError, ConfigError
    from modelfuse.io import load_into, open_checkpoint
    from modelfuse.merge.data_recipes import check_inputs_fit
    from modelfuse.zoo import build_architecture

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    states = []
    for path in (args.checkpoint_a, args.checkpoint_b):
        ckpt = open_checkpoint(Path(path))
        try:
            states.append({k: ckpt[k] for k in ckpt})
        finally:
            ckpt.close()
    try:
        check_same_architecture(states[0], states[1])
    except AlignmentError as exc:
        raise AlignmentError(f"{args.checkpoint_a} and {args.checkpoint_b}: {exc}") from None
    splits = mf_data.load(args.data, **key_values(args.data_option, "--data-option", "upsample=true"))
    options = key_values(args.arch_option, "--arch-option", "width=32")
    models = []
    for path, state in zip((args.checkpoint_a, args.checkpoint_b), states, strict=True):
        model = build_architecture(
            args.arch, input_shape=splits.input_shape, num_classes=splits.num_classes, options=options
        )
        try:
            load_into(model, state)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace("the state_dict", str(path), 1)) from None
        models.append(model.to(args.device).eval())
    where = f"--data {args.data} --split {args.split}"
    check_inputs_fit(models[0], getattr(splits, args.split), where, args.device)
    return splits, models[0], models[1]
