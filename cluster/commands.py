"""Shell commands as a shell reads them, for the config checks (`cluster/checks.py`): shell words,
quotes, `;`/`&&`/newlines, `export` and `NAME=value` prefixes (the last assignment winning), and
`ray start` options in both `--opt=value` and `--opt value` forms, so `--dashboard-host="::"` or
a token setting inside an `echo` are seen for what they are."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field


@dataclass
class Command:
    """One simple command: its words and the environment it runs with."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


def shell_commands(text: str, environment: dict[str, str] | None = None) -> list[Command]:
    """The simple commands of a shell command line, each with the environment it sees: the
    exported variables so far plus its own `NAME=value` prefixes (later ones win)."""
    exported = dict(environment or {})
    variables: dict[str, str] = {}
    lexer = shlex.shlex(text.replace("\\\n", " ").replace("\n", " ; "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands: list[Command] = []
    words: list[str] = []

    def finish() -> None:
        prefix: dict[str, str] = {}
        rest = list(words)
        while rest and _ASSIGNMENT.match(rest[0]):
            name, value = _ASSIGNMENT.match(rest.pop(0)).groups()
            prefix[name] = value
        if rest[:1] == ["env"]:  # env NAME=value ... command
            rest.pop(0)
            while rest and (_ASSIGNMENT.match(rest[0]) or rest[0].startswith("-")):
                match = _ASSIGNMENT.match(rest.pop(0))
                if match:
                    prefix[match.group(1)] = match.group(2)
        if not rest:  # a bare assignment: a shell variable, exported only if already exported
            variables.update(prefix)
            exported.update({k: v for k, v in prefix.items() if k in exported})
        elif rest[0] == "export":
            for word in rest[1:]:
                match = _ASSIGNMENT.match(word)
                if match:
                    exported[match.group(1)] = variables[match.group(1)] = match.group(2)
                elif word in variables:
                    exported[word] = variables[word]
        elif rest[0] == "unset":
            for word in rest[1:]:
                exported.pop(word, None)
                variables.pop(word, None)
        else:
            commands.append(Command(rest, {**exported, **prefix}))
        words.clear()

    for token in lexer:
        if token and set(token) <= set(";&|()"):
            if words:
                finish()
        else:
            words.append(token)
    if words:
        finish()
    return commands


def ray_start_options(argv: list[str]) -> dict[str, str] | None:
    """`{option: value}` of a `ray start` command (`--opt=value` or `--opt value`; flags -> ""),
    or None for any other command."""
    if len(argv) < 2 or os.path.basename(argv[0]) != "ray" or argv[1] != "start":
        return None
    options: dict[str, str] = {}
    index = 2
    while index < len(argv):
        word = argv[index]
        if word.startswith("--"):
            name, sep, value = word[2:].partition("=")
            if not sep and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                value, index = argv[index + 1], index + 1
            options[name] = value
        index += 1
    return options


def is_loopback_host(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_start_findings(commands: list[str], where: str, key: str) -> list[str]:
    """Each `ray start` in a launcher command list: token auth in the environment it runs with,
    the dashboard on loopback. Every list item runs in its own shell (the launcher's way)."""
    found, starts = [], 0
    for index, line in enumerate(commands):
        for command in shell_commands(line):
            options = ray_start_options(command.argv)
            if options is None:
                continue
            starts += 1
            mode = command.env.get("RAY_AUTH_MODE")
            if mode != "token":
                found.append(f"{where}: {key}[{index}]: ray start runs with RAY_AUTH_MODE={mode or 'unset'} "
                             "(token auth must be on)")
            host = options.get("dashboard-host")
            if host is not None and not is_loopback_host(host):
                found.append(f"{where}: {key}[{index}]: ray start binds the dashboard to {host!r} "
                             "(keep --dashboard-host=127.0.0.1 and tunnel to it)")
    if commands and not starts:
        found.append(f"{where}: {key}: no `ray start` found")
    return found
