"""The ``finercam`` command line.

``example`` trains a toy fine-grained classifier on the spot and explains it; ``explain`` explains one image with any
model; ``layers`` lists a model's candidate target layers; ``train-probe`` fits a linear head on a frozen backbone;
``synth`` writes the synthetic benchmark; ``demo`` runs the main job; ``evaluate`` scores base CAMs and Finer-CAM on a
dataset; ``concepts`` localises a text concept against reference concepts with CLIP; ``run`` explains a whole dataset
into a result store, which ``visualize``, ``report`` and ``export`` read; ``web`` serves the demo page in a browser;
``version`` prints versions.
User errors are printed as one line (exit status 2), never as a traceback; Ctrl-C stops a command with one line (exit
status 130)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import finercam
from finercam.argtypes import (
    FIGURE_SUFFIXES,
    HEAD_HELP,
    MODEL_HELP,
    PREPROCESS_HELP,
    WEIGHTS_HELP,
    non_negative_float,
    output_dir,
    output_file,
    whole_number,
)
from finercam.argtypes import gamma as _gamma
from finercam.argtypes import non_negative_int as _non_negative_int
from finercam.argtypes import positive_int as _positive_int
from finercam.argtypes import seed as _seed
from finercam.explain import DEFAULT_GAMMA
from finercam.hints import argument_hints, command_line_hints
from finercam.methods import METHODS

INTERRUPTED_STATUS = 130
"""The exit status after Ctrl-C (128 + SIGINT), as shells report it."""
RESUMABLE_COMMANDS = ("run", "evaluate")
"""Commands that keep the results written so far and resume when rerun with the same options."""
MAX_SYNTH_SIZE = 1024
"""The largest image side ``finercam synth`` renders."""
MAX_DRY_RUN_SIZE = 4096
"""The largest input side ``finercam layers --size`` dry-runs."""


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argument type for a whole number from ``low`` to ``high`` (the bound named in the error)."""

    def parse(text: str) -> int:
        rule = f"must be a whole number from {low} to {high}"
        value = whole_number(text, rule)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return parse


def figure_path(text: str) -> str:
    """The ``--out`` of ``explain`` and ``concepts``, checked before any work: an existing folder or a name ending in
    ``/`` (the figure goes inside, under its default name), a file name with a figure suffix
    (:data:`~finercam.argtypes.FIGURE_SUFFIXES`), or one without a suffix (``.png`` is added).

    Returns:
        A folder with a trailing separator, else the figure file (see :func:`figure_file`).
    """
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        return str(output_dir(text)) + os.sep
    if not path.suffix:
        path = path.with_suffix(".png")
    elif path.suffix.lower() not in FIGURE_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"'{path}' is not a figure file: give a name ending in one of {', '.join(FIGURE_SUFFIXES)} (no suffix "
            "writes .png), or a folder"
        )
    return str(output_file(*FIGURE_SUFFIXES)(str(path)))


def figure_file(out: str | None, default_name: str, default_folder: Path, *, inputs: Sequence[str | Path] = ()
                ) -> Path:
    """Where a figure goes: ``out`` as :func:`figure_path` returns it (a folder gets ``default_name``), or
    ``default_folder / default_name`` when not given. Its maps go beside it, with the suffix ``.safetensors``.

    Raises:
        InvalidArgumentError: the figure or its maps would overwrite one of ``inputs`` (the image being explained).
        MissingDependencyError: matplotlib, which draws the figure, is not installed (said before any work).
    """
    from finercam.errors import InvalidArgumentError
    from finercam.viz import require_matplotlib

    require_matplotlib()

    if out is None:
        path = default_folder / default_name
    elif out.endswith(("/", os.sep)) or Path(out).is_dir():
        path = Path(out) / default_name
    else:
        path = Path(out)
    for source in inputs:
        for what, written in (("figure", path), ("maps", path.with_suffix(".safetensors"))):
            if written.resolve() == Path(source).resolve():
                raise InvalidArgumentError(
                    f"--out {out!r} would write the {what} over the input image {str(source)!r}; give another name"
                )
    return path


MAPS_FORMAT = "format"
"""The metadata key of a maps file that says which command wrote it (``finercam-explain-maps``, ...)."""


def maps_file(figure: Path, kind: str, legacy_key: str | None = None) -> Path:
    """The maps file beside ``figure`` (``.safetensors``), checked before any work: an existing file is replaced
    only if it holds maps of this ``kind`` (metadata ``format``; files of earlier versions: metadata
    ``legacy_key``), never a checkpoint or head that happens to share the figure's name.

    Raises:
        InvalidArgumentError: the file exists and is something else.
    """
    from safetensors import SafetensorError, safe_open

    from finercam.errors import InvalidArgumentError

    path = figure.with_suffix(".safetensors")
    if not path.exists():
        return path
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        metadata = {}
    if metadata.get(MAPS_FORMAT) == kind or (legacy_key is not None and legacy_key in metadata
                                              and MAPS_FORMAT not in metadata):
        return path
    raise InvalidArgumentError(
        f"the maps would go to {str(path)!r}, which exists and is not a maps file of this command (a checkpoint or "
        "head?); it is left as it is: give --out another name"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finercam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser(
        "example", help="train a toy fine-grained classifier (CPU, about 30 s) and explain it with Finer-CAM"
    )
    example.add_argument("--out", type=output_dir, default="finercam-out",
                         help="output folder (default: ./finercam-out)")
    example.add_argument("--seed", type=_seed, default=0)
    example.add_argument("--method", default="gradcam", choices=sorted(METHODS))
    example.add_argument("--gamma", type=_gamma, default=DEFAULT_GAMMA)
    example.add_argument("--epochs", type=_positive_int, default=5)
    example.add_argument("--train-size", type=_positive_int, default=5000)
    example.add_argument("--test-size", type=_positive_int, default=1000)
    example.add_argument("--eval-size", type=_positive_int, default=100, help="test images scored by the pointing game")
    example.add_argument(
        "--dilation", type=bounded_int(0, 1000), default=1,
        help="also score with the difference mask grown by this many pixels (always: one cell of the map, 4 px)",
    )
    example.add_argument(
        "--num-references", type=_positive_int, default=1,
        help="T nearest reference classes (default 1: with 4 classes, T=3 would contrast with every other class, "
        "which for a linear head is nearly the baseline map)",
    )
    example.add_argument(
        "--threads", type=_non_negative_int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    _add_explain(commands)
    _add_layers(commands)
    _add_probe(commands)
    _add_synth(commands)
    _add_demo(commands)
    _add_evaluate(commands)
    _add_concepts(commands)
    _add_dataset(commands)
    _add_web(commands)
    commands.add_parser("version", help="print the versions of finercam and torch")
    return parser




def _add_model_arguments(parser: argparse.ArgumentParser, *, head: bool = True) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--weights", help=WEIGHTS_HELP)
    if head:
        parser.add_argument("--head", help=HEAD_HELP)
    parser.add_argument("--preprocess", help=PREPROCESS_HELP)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")


def _add_explain(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser("explain", help="explain one image: prediction, references and a PNG")
    explain.add_argument("image", help="the image file")
    _add_model_arguments(explain)
    explain.add_argument("--layer", help="target layer (default: the model's recommended layer, else auto)")
    explain.add_argument("--method", default="gradcam", choices=sorted(METHODS))
    explain.add_argument("--target", help="class index or name to explain (default: the top prediction)")
    explain.add_argument("--references", choices=["nearest", "top", "weights"],
                         help="how the reference classes are chosen (default: nearest)")
    explain.add_argument("--num-references", type=_positive_int, help="how many reference classes (default: 3)")
    explain.add_argument(
        "--versus", action="append", metavar="CLASS",
        help="a reference class to contrast with, by index or name (repeat for several): why the explained class "
        "and not this one; instead of --references and --num-references",
    )
    explain.add_argument(
        "--classes", type=_positive_int, metavar="K",
        help="explain each of the K top predictions against its own references, one row of the figure each, from "
        "one forward pass (instead of --target)",
    )
    explain.add_argument("--gamma", type=_gamma, default=DEFAULT_GAMMA)
    explain.add_argument("--aggregation", default="mean", choices=["mean", "softmax"])
    explain.add_argument(
        "--out", type=figure_path,
        help=f"figure to write ({', '.join(FIGURE_SUFFIXES)}; no suffix writes .png), or a folder to put it in "
        "(default: ./finercam-out/<image name>.finercam.png)",
    )


def _add_layers(commands: argparse._SubParsersAction) -> None:
    layers = commands.add_parser("layers", help="list a model's candidate target layers")
    layers.add_argument("model", help=MODEL_HELP)
    layers.add_argument("--weights", help=WEIGHTS_HELP)
    layers.add_argument("--head", help=HEAD_HELP + "; its layers are listed under backbone.")
    layers.add_argument(
        "--size", type=bounded_int(1, MAX_DRY_RUN_SIZE), nargs=2, metavar=("H", "W"),
        help=f"input size of the dry run, each side at most {MAX_DRY_RUN_SIZE} (default: the size the model's "
        "preprocessing or configuration gives, else 224 x 224)",
    )


def _add_probe(commands: argparse._SubParsersAction) -> None:
    probe = commands.add_parser("train-probe", help="fit a linear head on a frozen backbone over an ImageFolder")
    _add_model_arguments(probe, head=False)
    probe.add_argument("--data", required=True, help="ImageFolder root, or a folder with train/ and val/ (or test/)")
    probe.add_argument("--out", required=True, type=output_file(".safetensors"),
                       help="the head file to write (.safetensors)")
    probe.add_argument("--pooling", default="auto", help="auto, mean-patch, cls or pooled")
    probe.add_argument("--val-fraction", type=float, default=0.2, help="held out per class without a val/ folder")
    probe.add_argument("--batch-size", type=_positive_int, default=32)
    probe.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                       help="L2 penalty on the head's weights, >= 0 (default %(default)s)")
    probe.add_argument("--cache", type=output_dir, default=".finercam-cache",
                       help="feature cache folder (default: ./.finercam-cache)")
    probe.add_argument("--seed", type=_seed, default=0)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth", help="write a procedural fine-grained dataset (ImageFolder train/ test/ + annotations.json)"
    )
    synth.add_argument("--out", required=True, type=output_dir, help="output folder (created when missing)")
    synth.add_argument("--train", type=_non_negative_int, default=2000, help="training images (default 2000)")
    synth.add_argument("--test", type=_non_negative_int, default=500, help="test images (default 500)")
    synth.add_argument("--seed", type=_seed, default=0)
    synth.add_argument("--size", type=bounded_int(32, MAX_SYNTH_SIZE), default=64,
                       help=f"image side in pixels, 32 to {MAX_SYNTH_SIZE} (default 64)")
    synth.add_argument("--genera", type=_positive_int, default=3, help="number of genera, 1 to 5 (default 3)")
    synth.add_argument("--species", type=_positive_int, default=4, help="species per genus, 1 to 12 (default 4)")
    synth.add_argument("--occlusion", type=float, default=0.5, help="probability of an occluder (default 0.5)")
    synth.add_argument("--distractors", type=_non_negative_int, default=4, help="blobs per background (default 4)")
    synth.add_argument("--max-rotation", type=float, default=25.0, help="degrees either way (default 25)")
    synth.add_argument(
        "--scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
        help="body semi-major axis as a fraction of the image side (default 0.17 0.21)",
    )
    synth.add_argument(
        "--min-visible", type=float, default=0.5,
        help="an occluder leaves at least this fraction of each species-telling part visible (default 0.5)",
    )
    synth.add_argument("--noise", type=float, default=0.02, help="pixel noise standard deviation (default 0.02)")
    synth.add_argument("--overwrite", action="store_true", help="replace train/, test/ and annotations.json")
    synth.add_argument("--threads", type=_non_negative_int, default=0, help="torch CPU threads (default: torch's)")


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from finercam import demo

    parser = commands.add_parser(
        "demo", help="explain the embedded models on a fresh synthetic test set; write report.html and metrics.json"
    )
    parser.add_argument("--out", type=output_dir, default="finercam-demo",
                        help="output folder (default: ./finercam-demo)")
    parser.add_argument("--size", type=_positive_int, default=demo.DEFAULT_SIZE,
                        help=f"test images (default {demo.DEFAULT_SIZE})")
    parser.add_argument("--seed", type=_seed, default=demo.DEFAULT_SEED,
                        help="test-set seed; moved on if a model's card lists it (default %(default)s)")
    parser.add_argument("--models", nargs="+", default=["cnn", "vit"], help="embedded models (default: cnn vit)")
    parser.add_argument("--methods", nargs="+", default=list(demo.DEMO_METHODS), choices=sorted(METHODS),
                        help="base CAM methods (default: gradcam layercam scorecam)")
    parser.add_argument("--aggregations", nargs="+", default=list(demo.AGGREGATIONS), choices=list(demo.AGGREGATIONS),
                        help="reference aggregations: mean (paper) and softmax (official library) (default: both)")
    parser.add_argument("--tolerance", type=_non_negative_int, default=demo.DEFAULT_TOLERANCE,
                        help="pointing-game tolerance in pixels (default %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=demo.DEFAULT_BATCH,
                        help="images explained at once (default %(default)s)")
    parser.add_argument("--score-batch-size", type=_positive_int, default=demo.DEFAULT_SCORE_BATCH,
                        help="masked inputs per forward pass for Score-CAM (default %(default)s)")
    parser.add_argument("--threads", type=_non_negative_int, default=0, help="torch CPU threads (default: torch's)")


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    from finercam.evaluation.command import add_command

    add_command(commands, _add_model_arguments)


def _add_dataset(commands: argparse._SubParsersAction) -> None:
    from finercam.dataset.command import add_commands

    add_commands(commands)


def _add_web(commands: argparse._SubParsersAction) -> None:
    from finercam.web.command import add_commands

    add_commands(commands)


def _add_concepts(commands: argparse._SubParsersAction) -> None:
    from finercam.concepts.command import add_commands

    add_commands(commands)


def interrupted_message(command: str | None) -> str:
    """The one line printed when Ctrl-C stops ``command`` (``None``: before a command was parsed)."""
    if command is None:
        return "finercam: interrupted (Ctrl-C)"
    if command in RESUMABLE_COMMANDS:
        return (
            f"finercam {command}: interrupted (Ctrl-C); the results written so far are kept: rerun the same command to "
            "resume"
        )
    return f"finercam {command}: interrupted (Ctrl-C)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finercam`` console script; returns the exit status (2 for a user error, 130 after
    Ctrl-C)."""
    command: str | None = None  # forked workers ignore Ctrl-C: the parent stops them and reports it here
    warnings.formatwarning = _one_line_warning
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        command = args.command
        return _dispatch(parser, args)
    except KeyboardInterrupt:
        # on a terminal, first clear the line: a progress line redrawn in place, or the "^C" the terminal echoed
        clear = "\r\x1b[K" if getattr(sys.stderr, "isatty", lambda: False)() else ""
        print(clear + interrupted_message(command), file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS
    except BrokenPipeError:  # the output was piped into a reader that stopped (``| head``): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit raises no second error
        return 1
    finally:
        warnings.formatwarning = _DEFAULT_FORMAT


_DEFAULT_FORMAT = warnings.formatwarning


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """finercam's own warnings (random weights, a head trained on another backbone) as one line, without the
    Python source line; other libraries' warnings as Python prints them."""
    if f"{os.sep}finercam{os.sep}" in filename or filename.startswith("finercam"):
        return f"finercam: warning: {argument_hints(str(message))}\n"
    return _DEFAULT_FORMAT(message, category, filename, lineno, line)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command; user errors become one line on stderr."""
    if args.command == "example" and args.eval_size > args.test_size:
        parser.error(f"--eval-size {args.eval_size} is larger than --test-size {args.test_size}")
    if args.command == "version":
        print(f"finercam {finercam.__version__} (torch {torch.__version__})")
        return 0
    from finercam.errors import FinerCAMError, MissingDependencyError

    try:
        if args.command == "synth":
            from finercam.synth.command import run_synth

            return run_synth(args)
        if args.command == "example":
            from finercam.example import run_example

            return run_example(args)
        if args.command == "demo":
            from finercam.demo import run_demo

            return run_demo(args)
        from finercam.dataset import command as dataset_command

        if args.command in dataset_command.COMMANDS:
            return dataset_command.dispatch(args)
        if args.command == "concepts":
            from finercam.concepts.command import dispatch

            return dispatch(args)
        if args.command == "web":
            from finercam.web.command import dispatch as web

            return web(args)
        if args.command == "evaluate":
            from finercam.evaluation.command import run_evaluate

            return run_evaluate(args)
        from finercam import commands

        return {"explain": commands.run_explain, "layers": commands.run_layers, "train-probe": commands.run_probe}[
            args.command
        ](args)
    except MissingDependencyError as error:
        print(f"finercam: {error}", file=sys.stderr)
        return 1
    except FinerCAMError as error:
        hinted = command_line_hints(str(error), getattr(args, "model", None))
        print(f"finercam {args.command}: {hinted}", file=sys.stderr)
        return 2
    except OSError as error:
        # a path the checks could not foresee (a folder that cannot be created, /proc, a read-only mount, a name too
        # long, a full disk); not a library's own OSError (no errno) nor `| head` (main() ends a broken pipe quietly)
        path_error = isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
        if not path_error and (error.errno is None or isinstance(error, BrokenPipeError)):
            raise
        where = f": {error.filename!r}" if error.filename else ""
        print(f"finercam {args.command}: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
