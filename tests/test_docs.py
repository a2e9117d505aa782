"""docs/commands.md is complete: every `genssd` command and sub-command has a section there, and
every flag it takes is named in that section (not just somewhere on the page)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from genssd_cli.cli.app import app

COMMANDS_MD = Path(__file__).resolve().parent.parent / "docs" / "commands.md"


# Typer's click objects are read by their attributes (typer 0.29 ships its own copy of click, so
# `isinstance(x, click.Group)` with the click package is False).
def commands(group, path: tuple[str, ...] = ("genssd",)) -> list[tuple[str, object]]:
    """Every command under `group`, sub-groups' commands included, as ("genssd bench gpu", command)."""
    found = []
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):  # a group, such as `genssd bench`
            found += commands(command, (*path, name))
        else:
            found.append((" ".join((*path, name)), command))
    return found


def long_flags(command) -> list[str]:
    """The long names a user types (`--max-cost`); click adds --help itself, which is not a param."""
    options = [p for p in command.params if p.param_type_name == "option"]
    return sorted({o for p in options for o in p.opts if o.startswith("--")})


def section(doc: str, title: str) -> str | None:
    """The text under the heading "## `TITLE`" (any level) up to the next heading of its level or
    above; None when there is no such heading."""
    match = re.search(rf"^(#+) `{re.escape(title)}`[ \t]*$", doc, flags=re.MULTILINE)
    if match is None:
        return None
    level = len(match.group(1))
    rest = doc[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.MULTILINE)
    return rest[: end.start()] if end else rest


def names(text: str, flag: str) -> bool:
    """`--set` named as itself, not as the start of `--settings` or the end of `---set`."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_every_flag_of_every_command_is_in_its_section_of_commands_md():
    """A flag added to the CLI without a word in docs/commands.md fails here, naming it."""
    doc = COMMANDS_MD.read_text(encoding="utf-8")
    root = typer.main.get_command(app)
    found = commands(root)
    assert len(found) >= 14, "the walk missed commands: run, train, eval, … and bench's sub-commands"
    missing = []
    for title, command in found:
        text = section(doc, title)
        if text is None:
            missing.append(f"{title}: no section headed `{title}`")
            continue
        missing += [f"{title}: {flag}" for flag in long_flags(command) if not names(text, flag)]
    # The root's own flags (--version) belong to the page's opening, before the first command.
    opening = doc.split("\n## ", 1)[0]
    missing += [f"genssd: {flag}" for flag in long_flags(root) if not names(opening, flag)]
    assert not missing, "not in docs/commands.md, in the command's section: " + "; ".join(missing)


def test_the_section_reader_keeps_to_its_section():
    """The check above can fail: a flag documented only under another command does not count, and a
    sub-section (### Methods under ## `genssd run`) belongs to its command's section."""
    doc = "# T\n## `genssd run`\n--limit\n### Methods\n--force\n## `genssd tune`\n--max-cost\n"
    run = section(doc, "genssd run")
    assert names(run, "--limit") and names(run, "--force")
    assert not names(run, "--max-cost")
    assert section(doc, "genssd bench gpu") is None
    assert not names("--settings and ---set", "--set")
