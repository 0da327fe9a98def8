"""Docs that cannot drift (issue 31, item 4): every `selfsup …` command line in README.md and
docs/*.md goes through the real argument parser, and every `--set` it uses through the real
config builder, so a renamed flag, subcommand or config key fails here.

Whole lines in fenced blocks must parse completely (required arguments included); a command in
an inline code span is often a fragment (`selfsup pretrain --method M`), so there only its
subcommand, its flags and its `--set` keys are checked. Placeholders are skipped where they stand
for a value: a method `M` checks the keys against every method, `knn|linear` takes the first
choice, `[--size 64]` is an optional part, an ellipsis (`…`) or a `--config FILE` leaves the
config unchecked."""

import dataclasses
import glob
import os
import re
import shlex

import pytest

from methods import METHODS
from pipelines.cli import build_parser, parse_sets
from pipelines.config import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CONFIG_SETS = {"pretrain", "tune"}  # subcommands whose --set keys are a pretraining config's


def doc_commands(text: str) -> list[tuple[int, str, bool]]:
    """(line number, command after `selfsup `, whole line?) of every `selfsup` command in a
    Markdown text: fenced lines (with `\\` continuations joined, `# comments` cut) and inline
    code spans."""
    commands, fenced, lines = [], False, text.splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced and re.match(r"\s*(\$ )?selfsup ", line):
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            command = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ "))
            commands.append((number, command, True))
        elif not fenced:
            commands.extend((number, span, False) for span in re.findall(r"`(selfsup [^`]+)`", line))
        i += 1
    return [(n, part.strip().removeprefix("selfsup").strip(), whole) for n, command, whole in commands
            for part in re.split(r"\s&&\s|\s\|\s", command) if part.strip().startswith("selfsup ")]


def normalized(command: str) -> list[str] | None:
    """The command's words as the parser gets them, or None for a line that is no command to run
    (an elided path `…`, an error message `selfsup pretrain: error: …`)."""
    words = shlex.split(re.sub(r"\[--[^\]]*\]", "", command))  # `[--size 64]`: an optional part
    if not words or any("…" in word for word in words) or words[0].endswith(":"):
        return None
    return [word.split("|")[0] for word in words]  # `knn|linear`: the first choice


def all_commands():
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            for number, command, whole in doc_commands(f.read()):
                words = normalized(command)
                if words is not None:
                    yield pytest.param(words, whole, id=f"{doc}:{number}")


def subparser_of(parser, words: list[str]):
    """(the subparser `words` name, the words after its name)."""
    while parser._subparsers is not None and words and not words[0].startswith("-"):
        choices = next(a for a in parser._subparsers._actions if hasattr(a, "choices") and a.choices).choices
        assert words[0] in choices, f"no subcommand {words[0]!r} (have: {', '.join(choices)})"
        parser, words = choices[words[0]], words[1:]
    return parser, words


def option_values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == flag]


def check_sets(subcommand: str, words: list[str]) -> None:
    """The command's `--set`s are accepted by the config they change."""
    sets = parse_sets(option_values(words, "--set"))
    if not sets or "--config" in words:
        return
    methods = option_values(words, "--method")
    if subcommand in CONFIG_SETS:
        presets = option_values(words, "--preset")
        names = methods if methods and methods[0] in METHODS else sorted(METHODS)
        errors = []
        for name in names:
            try:
                build_config(name, presets[0] if presets else None, sets=sets)
                return
            except ValueError as error:
                errors.append(f"{name}: {error}")
        pytest.fail(f"--set {sets} fits no method: {'; '.join(errors)}")
    elif subcommand == "viz augment":
        from pipelines.outputs.viz import default_recipe

        default_recipe(methods[0], 32).with_overrides(sets)
    elif subcommand == "finetune":
        from pipelines.train.classifier import FineTuneConfig

        fields = {f.name for f in dataclasses.fields(FineTuneConfig)}
        for key, value in sets.items():
            section, _, field = key.partition(".")
            if section == "finetune":
                assert field.split(".")[0] in fields, f"--set {key}: no such fine-tuning setting"
            else:
                build_config("simclr", sets={key: value})


@pytest.mark.parametrize("words,whole", list(all_commands()))
def test_every_documented_command_parses(words, whole):
    parser, rest = subparser_of(build_parser(), words)
    subcommand = " ".join(words[:len(words) - len(rest)])
    known = parser._option_string_actions
    for word in rest:
        flag = word.split("=")[0]
        if flag.startswith("--"):
            assert flag in known, f"selfsup {subcommand}: no option {flag}"
    if whole:
        try:
            build_parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"selfsup {' '.join(words)}: refused by the argument parser")
    check_sets(subcommand, words)


def test_the_docs_hold_commands_and_a_planted_mismatch_fails():
    """The scan finds the commands (it is not vacuously green) and catches a renamed flag."""
    commands = list(all_commands())
    assert len(commands) > 50
    planted = doc_commands("```\nselfsup pretrain --method simclr --data d --set optim.epochz=2\n```\n"
                           "`selfsup eval knn --checkpont c`\n")
    with pytest.raises(pytest.fail.Exception, match="fits no method"):
        test_every_documented_command_parses(normalized(planted[0][1]), planted[0][2])
    with pytest.raises(AssertionError, match="no option --checkpont"):
        test_every_documented_command_parses(normalized(planted[1][1]), planted[1][2])
