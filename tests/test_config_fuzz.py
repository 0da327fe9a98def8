"""Every field of every section of every method, set to a string, a bool, a list, null, a negative
number and nan: refused in one line naming the key, or accepted, and never any other error. A
number field never takes a bool, a string or nan; a bool field never takes a number."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from methods import METHODS
from methods.views import ViewSpec
from pipelines.cli import main
from pipelines.config import build_config
from tests.helpers.cli import said_lines

VALUES = {"string": "abc", "bool": True, "list": [1, 2], "null": None, "negative": -1, "nan": float("nan")}
SECTIONS = ("backbone", "hparams", "data", "optim", "train", "tracking")


def fields_of(method: str) -> list[tuple[str, object]]:
    """(`--set` key, type hint) of every field the method's config has, views included."""
    config = build_config(method, "tiny")
    keys = [(f"{section}.{field.name}", typing.get_type_hints(type(getattr(config, section)))[field.name])
            for section in SECTIONS for field in dataclasses.fields(getattr(config, section))]
    return keys + [(f"views.{view}.{field.name}", typing.get_type_hints(ViewSpec)[field.name])
                   for view in config.recipe().views for field in dataclasses.fields(ViewSpec)]


def refused(method: str, key: str, value) -> str | None:
    """The one-line refusal of `--set key=value`, or None when it is accepted."""
    try:
        build_config(method, "tiny", sets={key: value})
    except ValueError as error:
        return str(error)
    return None


def is_number(hint) -> bool:
    return hint in (int, float)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_field_refuses_a_wrong_value_in_one_line_naming_it(method):
    checked = 0
    for key, hint in fields_of(method):
        for kind, value in VALUES.items():
            message = refused(method, key, value)  # any other exception fails the test here
            checked += 1
            if message is not None:
                assert "\n" not in message and message.startswith(key), (key, kind, message)
            if is_number(hint) and kind in ("string", "bool", "list", "null", "nan"):
                assert message is not None, f"{key} ({hint.__name__}) accepted {kind} {value!r}"
            if hint is bool and kind != "bool":
                assert message is not None, f"{key} (bool) accepted {kind} {value!r}"
    assert checked >= 6 * 50  # every section's fields were tried, not a handful


@pytest.mark.parametrize("sets, says", [
    (["hparams.lars_trust=abc"], "hparams.lars_trust='abc': must be a finite number"),
    (["optim.epochs=true"], "optim.epochs=True: must be an integer"),
    (["optim.base_lr=nan"], "optim.base_lr=nan: must be a finite number"),
    (["train.compile=1"], "train.compile=1: must be true or false"),
    (["views.view.jitter=[0.4, 0.4]"], "views.view.jitter=[0.4, 0.4]: must be a list of 4 numbers"),
])
def test_the_cli_says_a_wrong_type_in_one_line_with_exit_2(sets, says, capsys, tmp_path):
    args = ["pretrain", "--method", "simclr", "--data", str(tmp_path)]
    assert main(args + [arg for item in sets for arg in ("--set", item)]) == 2
    lines = said_lines(capsys.readouterr().err)
    assert lines == [f"selfsup pretrain: error: {says}"]
