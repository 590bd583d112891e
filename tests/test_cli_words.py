"""One word per meaning on the command line: sample --max-tokens (positions),
bench --warmup-calls (untimed calls), --no-progress (train and bench); the
former spellings still parse into the same setting and are left out of --help."""
import argparse

import pytest

from anebackward import train
from anebackward.__main__ import COMMANDS, old_spelling


def parser_of(command):
    import importlib
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    return p


@pytest.mark.parametrize("command, new, old, dest, value, parsed", [
    ("sample", ["--max-tokens", "12"], ["--steps", "12"], "max_tokens", 12, 12),
    ("bench", ["--warmup-calls", "3"], ["--warmup", "3"], "warmup", 3, 3),
    ("bench", ["--no-progress"], ["--quiet"], "no_progress", True, True),
    ("train", ["--no-progress"], ["--quiet"], "no_progress", True, True),
])
def test_new_word_and_old_spelling_parse_alike(command, new, old, dest, value, parsed):
    p = parser_of(command)
    extra = ["model.bin"] if command == "sample" else []
    assert getattr(p.parse_args(extra + new), dest) == parsed
    assert getattr(p.parse_args(extra + old), dest) == parsed
    helptext = p.format_help()
    assert new[0] in helptext and old[0] + " " not in helptext.replace(new[0], "")


def test_defaults_come_from_the_new_word():
    assert parser_of("sample").parse_args(["m"]).max_tokens == 256
    assert parser_of("bench").parse_args([]).warmup is None       # then 2, or 1 with --quick
    assert parser_of("train").parse_args([]).no_progress is False
    assert train.Settings().steps == train.DEFAULTS["steps"] == 500


def test_old_spelling_is_hidden_from_help():
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=5)
    old_spelling(p, "--old", "new", type=int)
    assert p.parse_args([]).new == 5 and p.parse_args(["--old", "7"]).new == 7
    assert "--old" not in p.format_help()
