"""The documentation matches the code: README.md and docs/*.md are checked against the real command line.

Every `lightning-drop` command in a shell code block is parsed by the real parser (the subcommand must exist,
every option must be one of its options, spelled in full, with a valid value); `fit|validate|test` commands
go through LightningCLI's own parser, without building anything, and the configs they name must exist and
load. Inline commands (`lightning-drop drop --keep 0` in prose, often with placeholders) must name an existing
subcommand, existing options and valid choices. Study configs load, `python benchmarks/...` scripts exist with the options
used, `make` targets exist, YAML `class_path`s import, Python blocks compile and use only public `ld.` names,
relative links resolve (anchors included), and the README stays a front door of at most 10,500 bytes.
Nothing here loads a model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "lightning_drop").rglob("README.md"))]
README_LIMIT = 10_500

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL = {"", "bash", "sh", "shell", "console"}
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
SEPARATORS = {"&&", "||", ";", "|"}
# `python -m MODULE` entry points: the CLI, and LightningCLI alone (fit|validate|test only)
PYTHON_MODULES = {"lightning_drop.cli": None}


@dataclasses.dataclass
class Cmd:
    """One command found in a page: its words, where it is, and whether it is a full command (code block)."""

    page: Path
    line: int
    words: list[str]
    full: bool  # in a shell code block: parsed strictly; inline in prose: names checked only
    aliases: dict[str, str]  # `cp SRC DEST` earlier in the same block: DEST stands for SRC

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}:{' '.join(self.words)[:60]}"


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _without_fences(text: str) -> str:
    """`text` with fenced blocks blanked (line numbers kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _split_commands(words: list[str]) -> list[list[str]]:
    out, current = [], []
    for word in words:
        if word in SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [c for c in out if c]


def shell_commands(page: Path) -> list[Cmd]:
    """Every command of the page's shell code blocks and inline code spans."""
    text = page.read_text(encoding="utf-8")
    found: list[Cmd] = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL:
            continue
        start = _line_of(text, block.start(2))
        aliases: dict[str, str] = {}
        logical, first = "", start
        for offset, raw in enumerate(block.group(2).split("\n")):
            if not logical:
                first = start + offset
            if raw.rstrip().endswith("\\"):
                logical += raw.rstrip()[:-1] + " "
                continue
            logical += raw
            try:
                words_of_line = shlex.split(logical, comments=True)
            except ValueError:  # not shell (an unlabelled block of output): no command to check
                words_of_line = []
            for words in _split_commands(words_of_line):
                if words[0] == "cp" and len(words) == 3:
                    aliases[words[2]] = words[1]
                found.append(Cmd(page, first, words, True, dict(aliases)))
            logical = ""
    prose = _without_fences(text)
    for span in INLINE.finditer(prose):
        words = span.group(1).replace("...", " ").split()
        if words and _invocation(words):
            found.append(Cmd(page, _line_of(prose, span.start()), words, False, {}))
    return found


def _invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(kind, arguments) of a command this test knows how to check, or None."""
    head = words[0]
    if head == "lightning-drop" or head.endswith("/lightning-drop"):
        return "lightning-drop", words[1:]
    if re.fullmatch(r"(\S*/)?python3?", head) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2].startswith("lightning_drop"):
            return "module", words[2:]
        if words[1].startswith("benchmarks/"):
            return "benchmark", words[1:]
    if head == "make":
        return "make", words[1:]
    if head == "pytest" or (len(words) > 2 and words[1:3] == ["-m", "pytest"]):
        return "pytest", words[1:]
    return None


CMDS = [c for page in PAGES for c in shell_commands(page) if _invocation(c.words)]


# ---------------------------------------------------------------- the checks

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from lightning_drop.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _strict_parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(args)
        except SystemExit:
            raise AssertionError(f"{args}: {err.getvalue().strip().splitlines()[-1:]}") from None


def _config_values(args: list[str]) -> list[str]:
    values = []
    for i, word in enumerate(args):
        if word in ("--config", "-c") and i + 1 < len(args):
            values.append(args[i + 1])
        elif word.startswith("--config="):
            values.append(word.split("=", 1)[1])
    return values


def _existing(path: str, aliases: dict[str, str], where: str) -> Path:
    source = aliases.get(path, path)
    resolved = REPO / source
    copied = f" (copied from {source})" if source != path else ""
    assert resolved.is_file(), f"{where}: {path} does not exist{copied}"
    return resolved


def _check_lightning(cmd: Cmd, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse with LightningCLI's real parser (configs included) and build nothing."""
    from lightning_drop.lightning import cli as lightning_cli
    from lightning_drop.errors import UserError

    configs = {c: _existing(c, cmd.aliases, cmd.id) for c in _config_values(args)}
    args = [str(configs.get(a, a)) if a in configs else a for a in args]

    class ParseOnly(lightning_cli.DropCLI):
        def _parse_ckpt_path(self) -> None:  # a documented checkpoint path need not exist here
            pass

        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str | None) -> None:
            pass

    monkeypatch.setattr(lightning_cli, "DropCLI", ParseOnly)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            lightning_cli.run_lightning_cli(args)
        except SystemExit as exit_:
            if exit_.code not in (0, None):  # 0: --print_config / --help printed and stopped
                raise AssertionError(f"{cmd.id}: {err.getvalue().strip().splitlines()[-1:]}") from None
        except UserError as mistake:  # a configuration mistake, as the command line would print it
            raise AssertionError(f"{cmd.id}: {mistake}") from None


def _check_choices(cmd: Cmd, parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Values of options with fixed choices are among them (`a|b` lists several; an ALL-CAPS word is a
    placeholder)."""
    choices = {o: [str(c) for c in a.choices] for a in parser._actions if a.choices for o in a.option_strings}
    for option, value in zip(args, args[1:]):
        if option in choices and not value.startswith("-") and not value.isupper():
            bad = [v for v in value.split("|") if v not in choices[option]]
            assert not bad, f"{cmd.id}: {option} {value}: invalid choice {bad} (choose from {choices[option]})"


def check_lightning_drop(cmd: Cmd, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_drop.cli import LIGHTNING_SUBCOMMANDS

    parsers = _subparsers()
    if not args or args[0].startswith("-"):
        names, rest = [""], args
    else:
        names, rest = args[0].split("|"), args[1:]
    for name in names:
        assert name in parsers, f"{cmd.id}: no subcommand {name!r} (there are: {', '.join(sorted(parsers)[1:])})"
        if name in LIGHTNING_SUBCOMMANDS:
            if cmd.full or _config_values(rest):
                _check_lightning(cmd, [name, *rest], monkeypatch)
            continue
        known = _options(parsers[name])
        unknown = [w for w in rest if w.startswith("-") and w != "-" and w.split("=", 1)[0] not in known]
        assert not unknown, f"{cmd.id}: `lightning-drop {name}` has no option {unknown}"
        _check_choices(cmd, parsers[name], rest)
        if cmd.full and not {"-h", "--help"} & set(rest):
            parsed = _strict_parse(parsers[""], [name, *rest])
            if name == "study":
                from lightning_drop.jobs.study import load_config

                load_config(_existing(parsed.config, cmd.aliases, cmd.id))


def check_benchmark(cmd: Cmd, args: list[str]) -> None:
    script = REPO / args[0]
    assert script.is_file(), f"{cmd.id}: {args[0]} does not exist"
    source = script.read_text() + (REPO / "benchmarks" / "_common.py").read_text()
    for word in args[1:]:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert f'"{option}"' in source, f"{cmd.id}: {args[0]} has no option {option}"


def check_make(cmd: Cmd, args: list[str]) -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for target in args or ["setup"]:
        if not target.startswith("-") and "=" not in target:
            assert target in targets, f"{cmd.id}: the Makefile has no target {target!r}"


def check_pytest(cmd: Cmd, args: list[str]) -> None:
    for word in args:
        if word.startswith("tests/"):
            assert (REPO / word.split("::")[0]).is_file(), f"{cmd.id}: {word} does not exist"


def check(cmd: Cmd, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (AssertionError) when `cmd` names a subcommand, option, file or target that does not exist."""
    kind, args = _invocation(cmd.words)
    for word in args:  # shipped files named anywhere in the command
        if re.match(r"(configs|benchmarks|tests|notebooks)/", word):
            _existing(word.split("::")[0], cmd.aliases, cmd.id)
    if kind == "module":
        module, args = args[0], args[1:]
        assert module in PYTHON_MODULES, f"{cmd.id}: `python -m {module}` is not an entry point"
        only = PYTHON_MODULES[module]
        assert only is None or (args and args[0] in only), f"{cmd.id}: `python -m {module}` runs only {only}"
        check_lightning_drop(cmd, args, monkeypatch)
    elif kind == "lightning-drop":
        check_lightning_drop(cmd, args, monkeypatch)
    elif kind == "benchmark":
        check_benchmark(cmd, args)
    elif kind == "make":
        check_make(cmd, args)
    else:
        check_pytest(cmd, args)


@pytest.mark.parametrize("cmd", CMDS, ids=[c.id for c in CMDS])
def test_documented_command(cmd: Cmd, monkeypatch: pytest.MonkeyPatch) -> None:
    check(cmd, monkeypatch)


def test_every_subcommand_is_documented() -> None:
    """Each subcommand appears in at least one checked command, so the checks above cover them all."""
    used = {part for c in CMDS if _invocation(c.words)[0] == "lightning-drop"
            for part in (_invocation(c.words)[1][:1] or [""])[0].split("|")}  # `python -m` forms not counted
    missing = set(_subparsers()) - {""} - used
    assert not missing, f"no page shows a command for: {sorted(missing)}"


@pytest.mark.parametrize("words, message", [
    ("lightning-drop drop --model m --output o --num 2 --no-such-option", "no option"),
    ("lightning-drop drop --model m --output o --num 2 --num-s 4", "no option"),  # abbreviations are not names
    ("lightning-drop drop --model m --output o --target head --num 2", "invalid choice"),
    ("lightning-drop prune --model m", "no subcommand"),
    ("lightning-drop study --config configs/study/missing.yaml", "does not exist"),
    ("lightning-drop fit --config configs/drop_and_recover.yaml --trainer.no_such_key 3", "unrecognized"),
    ("lightning-drop fit --config configs/missing.yaml", "does not exist"),
    ("python -m lightning_drop drop --model m", "not an entry point"),
    ("python -m lightning_drop.lightning.cli fit --config configs/drop_and_recover.yaml", "not an entry point"),
    ("python benchmarks/kv_cache.py --no-such-option 3", "has no option"),
    ("python benchmarks/no_such_benchmark.py", "does not exist"),
    ("make no-such-target", "no target"),
])
def test_the_check_rejects_what_does_not_exist(words: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError, match=message):
        check(Cmd(README, 0, words.split(), True, {}), monkeypatch)
    with pytest.raises(AssertionError, match=message):  # the same mistake in prose
        check(Cmd(README, 0, words.split(), False, {}), monkeypatch)


def test_a_copied_config_stands_for_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    page = REPO / "docs" / "large-models.md"
    fits = [c for c in shell_commands(page) if c.words[:2] == ["lightning-drop", "fit"] and c.aliases]
    assert fits, "the FSDP recovery command starts from a copy of a shipped config"
    for cmd in fits:
        check(cmd, monkeypatch)


# ---------------------------------------------------------------- README, links, YAML, Python

def test_readme_is_a_front_door() -> None:
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"
    text = README.read_text(encoding="utf-8")
    first = FENCE.search(text)
    assert first and first.start() < text.index("\n## "), "README.md starts with its commands"
    commands = [shlex.split(line, comments=True) for line in first.group(2).splitlines()]
    assert commands == [["make", "run"], ["make", "test"]]
    for page in PAGES[1:]:
        if page.parent == REPO / "docs" and page.name != "index.md":
            assert f"(docs/{page.name})" in text or f"({page.name})" in (REPO / "docs" / "index.md").read_text(), \
                f"{_rel(page)} is linked from neither README.md nor docs/index.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _without_fences(page.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    text = _without_fences(page.read_text(encoding="utf-8"))
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"line {_line_of(text, match.start())}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"line {_line_of(text, match.start())}: {target} (no such heading)")
    assert not broken, f"{_rel(page)}: " + "; ".join(broken)


def _blocks(language: str) -> list[tuple[Path, int, str]]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        out += [(page, _line_of(text, m.start()), m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]
    return out


def _class_paths(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for v in node.values() for p in _class_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _class_paths(v)]
    return []


YAML_BLOCKS = _blocks("yaml")
PYTHON_BLOCKS = _blocks("python")


@pytest.mark.parametrize("page, line, code", YAML_BLOCKS, ids=[f"{_rel(p)}:{n}" for p, n, _ in YAML_BLOCKS])
def test_yaml_blocks_name_real_classes(page: Path, line: int, code: str) -> None:
    paths = _class_paths(yaml.safe_load(code))
    for path in paths:
        if not path.startswith("lightning_drop."):
            continue  # a user's own class in an extension example (tests/test_extending.py runs those)
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{_rel(page)}:{line}: no class {path}"


@pytest.mark.parametrize("page, line, code", PYTHON_BLOCKS, ids=[f"{_rel(p)}:{n}" for p, n, _ in PYTHON_BLOCKS])
def test_python_blocks_use_public_names(page: Path, line: int, code: str) -> None:
    import lightning_drop as ld

    compile(code, f"{_rel(page)}:{line}", "exec")
    missing = [n for n in re.findall(r"\bld\.(\w+)", code) if not hasattr(ld, n)]
    assert not missing, f"{_rel(page)}:{line}: lightning_drop has no {missing}"


def test_ld_names_in_prose_exist() -> None:
    import lightning_drop as ld

    missing = []
    for page in PAGES:
        for name in re.findall(r"`ld\.(\w+)", _without_fences(page.read_text(encoding="utf-8"))):
            if not hasattr(ld, name):
                missing.append(f"{_rel(page)}: ld.{name}")
    assert not missing, missing
