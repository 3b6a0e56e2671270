"""``mmalign`` command line: train, eval, caption, data, export, report, demo, recipes.

Every command that computes a result prints one JSON object with its headline numbers as the last line of
standard output; logs and progress bars go to standard error. User errors are one line, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import MMAlignError

log = logging.getLogger("mmalign")


def emit(result: dict) -> None:
    """The headline JSON, last line of stdout."""
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, default=str), flush=True)


def cmd_train(args) -> dict:
    from .config import load_config
    from .distributed import leave_process_group
    from .recipes import recipe_file
    from .train import train

    overrides = list(args.set)
    if args.resume_from:
        overrides.append(f"train.resume_from={args.resume_from}")
    if args.no_resume:
        overrides.append("train.resume=false")
    try:
        with recipe_file(args.recipe) as path:
            cfg = load_config(path, overrides)
        return train(cfg)
    finally:
        leave_process_group()


def cmd_eval(args) -> dict:
    from .eval.runner import evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot
    from .rundir import load_scored_model

    model, scored = load_scored_model(args.model)
    if args.what == "linear-probe":
        return {**evaluate_linear_probe(model, args.train_data, args.data, args.query, args.batch_size, args.workers),
                **scored}
    if args.what == "zeroshot":
        return {**evaluate_zeroshot(model, args.data, args.classes, args.templates, args.query, args.text,
                                    args.batch_size, args.workers, args.score), **scored}
    return {**evaluate_retrieval(model, args.data, args.query, args.gallery, args.batch_size, args.workers, args.score,
                                 positives=args.positives), **scored}


def cmd_caption(args) -> dict:
    from .config import GenerationConfig, validate_generation
    from .eval.runner import evaluate_captions
    from .rundir import load_scored_model

    gen = GenerationConfig(
        strategy=args.strategy, num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
        top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, length_penalty=args.length_penalty, seed=args.seed,
    )
    validate_generation(gen, lambda key: "--" + key.replace("_", "-"))
    model, scored = load_scored_model(args.model)
    return {**evaluate_captions(model, args.data, args.out, gen, args.batch_size), **scored}


def cmd_data(args) -> dict:
    from .data.shards import parse_split, write_shards

    return write_shards(args.source, args.out, args.shard_size, strict=args.strict, overwrite=args.overwrite,
                        shuffle=not args.no_shuffle, seed=args.seed, split=parse_split(args.split))


def cmd_export(args) -> dict:
    from .export import export_model
    from .rundir import load_model_dir, resolve_model_dir, source_run

    model_dir = resolve_model_dir(args.model)
    return export_model(load_model_dir(model_dir), args.to, args.format, run=source_run(model_dir))


def cmd_report(args) -> dict:
    from .report import report_run

    return report_run(Path(args.run), args.examples)


def cmd_demo(args) -> dict:
    from .demos import run_demo

    return run_demo(args.name, Path(args.workdir), args.set)


def cmd_recipes(args) -> None:
    """Prints the shipped recipes, or one of them (no JSON line: ``recipes show NAME > my.yaml`` is a recipe)."""
    from . import recipes

    print(recipes.text(args.name) if args.what == "show" else recipes.listing(), end="" if args.what else "\n")


class Parser(argparse.ArgumentParser):
    """A usage error is one ``mmalign: error:`` line and exit status 2, like every other error (subcommands too)."""

    def error(self, message: str):
        print(f"mmalign: error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        sys.exit(2)


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def add_encoding_flags(parser: argparse.ArgumentParser) -> None:
    """How an evaluation reads and embeds its shards: batch size and DataLoader workers."""
    parser.add_argument("--batch-size", type=integer(1), default=256)
    parser.add_argument("--workers", type=integer(0), default=None,
                        help="DataLoader workers decoding the shards (default: one per shard, at most 4 and the CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mmalign", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a recipe (resumes from the run directory's last checkpoint)",
                       epilog="exit codes: 0 done, 2 error (one line), 75 stopped by SIGTERM/SIGUSR1/Ctrl-C after "
                              "writing a checkpoint (run the same command to resume), 130 second Ctrl-C")
    p.add_argument("recipe", help="a recipe file, or the name of a shipped recipe (`mmalign recipes` lists them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    resuming = p.add_mutually_exclusive_group()
    resuming.add_argument("--resume-from", metavar="CHECKPOINT",
                          help="resume from this checkpoint folder instead of the run's newest (train.resume_from)")
    resuming.add_argument("--no-resume", action="store_true",
                          help="start a new run; refused if run_dir already holds one (train.resume: false)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="zero-shot classification, retrieval or a linear probe with a trained model")
    ev = p.add_subparsers(dest="what", required=True)
    for what in ("zeroshot", "retrieval"):
        q = ev.add_parser(what)
        q.add_argument("--model", required=True, help="run directory or saved model folder")
        q.add_argument("--data", required=True, help="shards, e.g. 'data/val-{000000..000003}.tar'")
        q.add_argument("--query", default=None,
                       help="modality to classify / query with (default: the non-text one); several, comma-separated "
                            "(e.g. image,audio), score each candidate against the tuple (N-way)")
        q.add_argument("--score", default=None,
                       help="N-way score: mip (Symile), volume (GRAM), cosine (sum of cosines, pairwise); "
                            "default: the one the model was trained with")
        add_encoding_flags(q)
        if what == "zeroshot":
            q.add_argument("--classes", required=True,
                           help="file with one class name per line (as the samples' label.txt names them), or "
                                "'name: prompt' lines giving a class prompts of its own")
            q.add_argument("--templates", default=None, help="file with one prompt template per line, '{}' = class")
            q.add_argument("--text", default="text", help="text modality name")
        else:
            q.add_argument("--gallery", default="text")
            q.add_argument("--positives", choices=("sample", "label"), default="sample",
                           help="what a query should find: its own sample's items (default), or every item with its "
                                "label.txt (when captions repeat across samples)")
        q.set_defaults(fn=cmd_eval)
    q = ev.add_parser("linear-probe", help="logistic regression on the frozen embeddings of labelled training "
                                           "shards, scored on --data (as CLIP_benchmark's linear probe)")
    q.add_argument("--model", required=True, help="run directory or saved model folder")
    q.add_argument("--train-data", required=True, help="labelled shards to fit the classifier on")
    q.add_argument("--data", required=True, help="labelled shards to score it on")
    q.add_argument("--query", default=None, help="modality whose embeddings are probed (default: the non-text one)")
    add_encoding_flags(q)
    q.set_defaults(fn=cmd_eval)

    p = sub.add_parser("caption", help="generate captions with a CoCa model; scored when the data has references")
    p.add_argument("--model", required=True, help="run directory or saved model folder")
    p.add_argument("--data", required=True,
                   help="shards (references from their text, class words from label.txt) or files: a folder, a glob, "
                        "or paths joined by '::'")
    p.add_argument("--out", default="captions.jsonl", help="JSONL: key, caption, references and label if present")
    p.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="greedy")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=None, help="most tokens after BOS (default: the decoder's)")
    p.add_argument("--min-length", type=int, default=0)
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam: score / length ** penalty")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=integer(1), default=64)
    p.set_defaults(fn=cmd_caption)

    p = sub.add_parser("data", help="build WebDataset shards")
    dsub = p.add_subparsers(dest="what", required=True)
    q = dsub.add_parser("shards", help="CSV / JSONL of files and captions, or a folder per class -> shards")
    q.add_argument("--from", dest="source", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--shard-size", type=integer(1), default=1000, help="samples per shard")
    q.add_argument("--strict", action="store_true",
                   help="stop at the first file that does not decode, empty caption or missing file (default: skip "
                        "it and list it in the summary)")
    q.add_argument("--overwrite", action="store_true", help="replace the shards --out already holds")
    q.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: shuffled, seeded)")
    q.add_argument("--seed", type=integer(0), default=0, help="seed of the shuffle and the split")
    q.add_argument("--split", action="append", default=[], metavar="NAME=FRACTION",
                   help="also write a stratified held-out set, e.g. test=0.2 (train-*.tar gets the rest); repeatable")
    q.set_defaults(fn=cmd_data)

    p = sub.add_parser("export", help="write a trained model as a transformers or open_clip folder")
    p.add_argument("--model", required=True, help="run directory or saved model folder")
    p.add_argument("--to", required=True, help="output folder")
    p.add_argument("--format", choices=("hf", "open_clip"), default="hf")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="evaluate a run again; write report.html (+ report.md): plots, examples")
    p.add_argument("run", help="run directory")
    p.add_argument("--examples", type=integer(0), default=None,
                   help="queries per direction shown with their top retrieved items (default: eval.report_examples)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("demo", help="build offline demo data, train, evaluate, report")
    p.add_argument("name", nargs="?", default="lit")
    p.add_argument("--workdir", default="runs", help="where demo data and runs go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("recipes", help="list the shipped recipes; `recipes show NAME > my.yaml` to start from one")
    rsub = p.add_subparsers(dest="what")
    rsub.add_parser("show", help="print a shipped recipe").add_argument("name")
    p.set_defaults(fn=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = args.fn(args)
    except MMAlignError as e:
        print(f"mmalign: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mmalign: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
