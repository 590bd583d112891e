"""The `anebackward` command: `anebackward <command> [options]`.

Each command is a module with `add_arguments(parser)` and `run(args)`;
COMMANDS maps its name to that module, imported only when it is used.
"""
import argparse
import importlib
import sys

from ._version import __version__

def old_spelling(parser, flag, dest, **kw):
    """An option's former name: still parsed (into dest), absent from --help."""
    parser.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


COMMANDS = {
    "train": ("anebackward.train", "train a small Llama (default: the embedded corpus)"),
    "sample": ("anebackward.sample", "generate text from a llama2.c checkpoint or a Hugging "
               "Face model directory"),
    "bench": ("anebackward.bench", "benchmark the kernels and the training step"),
    "selfcheck": ("anebackward.selfcheck", "check every kernel against float64 NumPy"),
    "config": ("anebackward.capi", "compiler and linker flags for C programs (--cflags --libs)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="anebackward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"anebackward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if argv[:1] == [name]:  # import only the command being run
            modules[name] = importlib.import_module(modname)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
