"""The one command-line entry point: ``segcompress <verb> ...``.

Every pipeline stage is a verb that reads files and writes files; Snakemake and DVC only schedule
these commands. Each verb lives in ``segcompress.commands.<verb>`` with ``add_arguments(parser)``
and ``main(args) -> int``; modules are imported only when their verb runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys

# Set by the workflow (workflow/rules/common.smk): each job's log starts with the job's command, so
# the command survives a console quietened with `--quiet rules` (`make run`).
LOG_COMMAND_ENV = "SEGCOMPRESS_LOG_COMMAND"

VERBS: dict[str, str] = {
    "data": "generate (synthetic) or verify a dataset and write its manifest",
    "corrupt": "generate one seeded corrupted val set (a corruption at a severity; ADE20K-C / Cityscapes-C), resumable",
    "train": "train a dense Segmenter (resumable; torchrun for several GPUs)",
    "prune": "structural pruning (NViT-style, DepGraph) of a dense model to a GFLOPs target",
    "finetune": "fine-tune a pruned (or merged) model, optionally distilling from the dense one",
    "evaluate": "sliding-window mIoU of a model variant on a dataset split",
    "flops": "GFLOPs of a model or method (fvcore convention, one crop)",
    "match": "solve a token method's knob (ToMe/ToFu r, ALGM threshold, CTS K) for a GFLOPs target",
    "policy": "train the CTS policy net (which 2x2 superpatches hold one class)",
    "bench": "throughput (images/s) of a model or method",
    "convert": "import a released Segmenter checkpoint (mmseg or original format)",
    "rank": "normalised effective rank of a variant's encoder features restored on the patch grid",
    "qualitative": "prediction panels (image, ground truth, each variant) with zoomed crops",
    "report": "aggregate raw results into results/benchmark.csv, tables and figures",
}


def build_parser() -> argparse.ArgumentParser:
    from segcompress import __version__

    parser = argparse.ArgumentParser(prog="segcompress", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segcompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, help_text in VERBS.items():
        sub.add_parser(verb, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line: inside a workflow run its fork server may run it
        from segcompress.forkserver import delegate

        code = delegate(sys.argv)
        if code is not None:
            return code
        argv = sys.argv[1:]
    parser = build_parser()
    # Parse the verb first, then let the verb's module add its own arguments.
    # Global options (-v, --version, --help) may come before the verb: `segcompress -v train ...`.
    at = next((i for i, a in enumerate(argv) if a in VERBS), len(argv))
    known = parser.parse_args(argv[:at + 1])
    verb = known.verb
    verb_argv = argv[at + 1:] + (["--verbose"] if known.verbose else [])
    module = importlib.import_module(f"segcompress.commands.{verb.replace('-', '_')}")
    verb_parser = argparse.ArgumentParser(prog=f"segcompress {verb}", description=VERBS[verb])
    verb_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    module.add_arguments(verb_parser)
    args = verb_parser.parse_args(verb_argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.environ.get(LOG_COMMAND_ENV) == "1":
        logging.getLogger("segcompress").info("command: %s", shlex.join(["segcompress", *argv]))
    try:
        return int(module.main(args) or 0)
    except Exception as e:  # bad input, a full disk, an unwritable folder: one line, no traceback
        if args.verbose:
            raise
        print(f"segcompress {verb}: error: {error_text(e)} (-v shows the traceback)", file=sys.stderr)
        return 2


def error_text(e: BaseException) -> str:
    """One line for an error: the message of an expected error (bad input names its file and fix);
    for any other, its type too, so an unexpected failure is not mistaken for bad input."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, ValueError, KeyError)):
        return text
    if isinstance(e, OSError) and e.filename is not None:  # full disk, permission denied: name the path
        return f"{e.filename}: {e.strerror or text}"
    return f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
