"""The examples in the guides and in ``--help`` run as written.

Guides (README.md, docs/guide/*.md): a code block with ``<!-- runnable -->`` on the line just
above its opening fence is run, in a temporary folder that stands in for the reader's machine:

- ``console`` blocks: each ``$ ...`` command (with its ``\\`` and quoted continuation lines)
  runs in bash. A command whose shown output starts with ``error:`` must fail with that
  message; every other command must exit 0. The other shown output is not compared.
- ``bash``/``sh`` blocks: every line that is not a comment is a command.
- ``python`` blocks run as a script.
- ``<!-- runnable file=PATH -->`` writes the block (a config shown in full) to PATH instead.

``prism`` and ``.venv/bin/prism`` are this interpreter's ``python -m prism_cli``, ``python`` is
this interpreter, and ``/tmp`` is a folder of the temporary one. The first command starts in a
folder of links to the repository's files, so repository paths (``training/configs/...``)
resolve while relative outputs stay out of the repository. The blocks of a page share one
session (folder, working directory, environment: ``cd`` and ``export`` carry over) and run in
order: running one block runs the page's earlier blocks first. ``needs=PAGE`` continues PAGE's
session instead (a page that builds on another page's outputs). ``slow`` marks a block that
takes more than about 20 s; the blocks after it in its session are slow too.

``--help`` texts: every ``prism ...`` line under a command's "Examples:" parses with the real
command; the examples of commands that need nothing but the repository also run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer

import prism_cli

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*runnable\b(.*?)-->$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
TIMEOUT_S = 600
# help examples that need nothing but the repository: these run, the others only parse
RUN_HELP = ("prism data demo", "prism experiment list", "prism experiment show",
            "prism science")
SLOW_HELP = ("prism science chromatogram --schedule sd_scaled_linear",)  # the measured one: 10 s

# the reader's shell: prism and python are this interpreter (the repository on PYTHONPATH)
PRELUDE = """set -o pipefail
prism() { "$PRISM_PYTHON" -m prism_cli "$@"; }
python() { "$PRISM_PYTHON" "$@"; }
python3() { "$PRISM_PYTHON" "$@"; }
"""


@dataclass
class Command:
    line: int          # line of the guide where the command starts
    text: str
    output: list[str] = field(default_factory=list)  # the output shown under it


@dataclass
class Block:
    page: str          # path relative to the repository root
    line: int          # line of the opening fence
    lang: str
    body: list[tuple[int, str]]
    slow: bool = False
    needs: str | None = None
    file: str | None = None
    session: str = ""  # filled in by _sessions

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


# -- collecting the marked blocks ---------------------------------------------------------------

def collect(path: Path) -> list[Block]:
    """The code blocks of a Markdown file that carry the runnable marker."""
    page = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    blocks = []
    for i, text in enumerate(lines):
        m = MARKER.match(text.strip())
        if not m:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not fence:
            raise ValueError(f"{page}:{i + 1}: the runnable marker is not on the line just "
                             "above a code block")
        opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in m.group(1).split())
        unknown = set(opts) - {"slow", "needs", "file"}
        if unknown:
            raise ValueError(f"{page}:{i + 1}: unknown runnable option(s) {sorted(unknown)}")
        close, body = fence.group(1), []
        for j in range(i + 2, len(lines)):
            if lines[j].strip().startswith(close) and set(lines[j].strip()) == {close[0]}:
                break
            body.append((j + 1, lines[j]))
        else:
            raise ValueError(f"{page}:{i + 2}: the code block is not closed")
        blocks.append(Block(page, i + 2, fence.group(2), body, "slow" in opts,
                            opts.get("needs"), opts.get("file")))
    return blocks


def _complete(text: str) -> bool:
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def commands(block: Block) -> list[Command]:
    """The commands of a console or shell block, with the output shown under each."""
    cmds: list[Command] = []
    open_cmd = False
    for n, text in block.body:
        if open_cmd:
            cmds[-1].text += "\n" + text
        elif block.lang == "console" and text.startswith("$ "):
            cmds.append(Command(n, text[2:]))
        elif block.lang == "console":
            if cmds:
                cmds[-1].output.append(text)
            continue
        elif text.strip() and not text.lstrip().startswith("#"):
            cmds.append(Command(n, text))
        else:
            continue
        open_cmd = not _complete(cmds[-1].text)
    return cmds


def _sessions(blocks: list[Block]) -> dict[str, list[Block]]:
    """Blocks grouped by the session they run in, in order; slow spreads to what follows."""
    pages = {b.page for b in blocks}
    sessions: dict[str, list[Block]] = {}
    for b in blocks:
        if b.needs:
            needed = str(Path("docs/guide") / b.needs) if "/" not in b.needs else b.needs
            assert needed in pages, f"{b.id}: needs={b.needs}: no runnable block on that page"
            b.session = needed
        else:
            b.session = b.page
    for b in [b for b in blocks if not b.needs] + [b for b in blocks if b.needs]:
        sessions.setdefault(b.session, []).append(b)
    for chain in sessions.values():
        for i in range(1, len(chain)):
            chain[i].slow = chain[i].slow or chain[i - 1].slow
    return sessions


BLOCKS = [b for path in GUIDES for b in collect(path)]
SESSIONS = _sessions(BLOCKS)


# -- running them -------------------------------------------------------------------------------

class Session:
    """A reader's shell: a folder standing in for /tmp, a working directory, an environment."""

    def __init__(self, base: Path):
        self.tmp = base / "tmp"
        self.tmp.mkdir()
        self.state = base / "state"
        self.state.mkdir()
        self.cwd = base / "repo"
        self.cwd.mkdir()
        for name in _tracked_top_level():
            (self.cwd / name).symlink_to(ROOT / name)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "AWS_", "PRISM_"))}
        env.update(PRISM_PYTHON=sys.executable, PYTHONPATH=str(ROOT), MPLBACKEND="Agg",
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        self.env = env
        self.done: set[str] = set()
        self.failed: str | None = None

    def rewrite(self, text: str) -> str:
        """The guide's text as it runs here: /tmp -> the page's temporary folder."""
        text = re.sub(r"(?<![\w/])\.venv/bin/(prism|python3?)\b", r"\1", text)
        return re.sub(r"(?<![\w.])/tmp(?![\w.-])", str(self.tmp), text)

    def shell(self, text: str) -> subprocess.CompletedProcess:
        """Run one command in bash; keep its working directory and environment."""
        state = shlex.quote(str(self.state))
        script = (PRELUDE + text + f'\n__rc=$?; pwd > {state}/cwd; env -0 > {state}/env; '
                  "exit $__rc\n")
        res = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        if (self.state / "cwd").is_file():
            self.cwd = Path((self.state / "cwd").read_text().strip())
            pairs = (self.state / "env").read_text().split("\0")
            self.env = {k: v for k, v in (p.split("=", 1) for p in pairs if "=" in p)
                        if k not in ("_", "SHLVL", "PWD", "OLDPWD")}
            (self.state / "cwd").unlink()
        return res


def _tracked_top_level() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the visible entries
        return [p.name for p in ROOT.iterdir() if not p.name.startswith(".")]
    return sorted({line.split("/", 1)[0] for line in out.splitlines() if line}
                  & {p.name for p in ROOT.iterdir()})


class ExampleFailed(Exception):
    """A command of an example did not do what the guide shows."""


def _report(where: str, text: str, res: subprocess.CompletedProcess, why: str) -> str:
    return (f"{where}: {why}\n$ {text}\n--- stdout (end)\n{res.stdout[-3000:]}"
            f"\n--- stderr (end)\n{res.stderr[-3000:]}")


def run_block(block: Block, s: Session) -> None:
    """Run one marked block in session ``s``; fail naming the guide line that went wrong."""
    if block.file:
        path = Path(s.rewrite(block.file))
        path = path if path.is_absolute() else s.cwd / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(s.rewrite("\n".join(t for _, t in block.body)) + "\n")
        return
    if block.lang == "python":
        script = s.state / f"{Path(block.page).stem}-{block.line}.py"
        script.write_text(s.rewrite("\n".join(t for _, t in block.body)) + "\n")
        cmds = [Command(block.line + 1, f"python {shlex.quote(str(script))}")]
    else:
        cmds = [Command(c.line, s.rewrite(c.text), c.output) for c in commands(block)]
        assert cmds, f"{block.id}: a runnable block without commands"
    for cmd in cmds:
        res = s.shell(cmd.text)
        shown = cmd.output[0].strip() if cmd.output else ""
        where = f"{block.page}:{cmd.line}"
        if shown.startswith("error:"):  # the guide shows this command failing
            expected = " ".join(s.rewrite(shown).split("...")[0].split())
            got = " ".join((res.stdout + res.stderr).split())
            if res.returncode == 0 or expected not in got:
                raise ExampleFailed(_report(where, cmd.text, res, f"expected it to fail with "
                                            f"{expected!r}"))
        elif res.returncode != 0:
            raise ExampleFailed(_report(where, cmd.text, res, f"exited {res.returncode}"))


@pytest.fixture(scope="session")
def sessions(tmp_path_factory):
    made: dict[str, Session] = {}

    def get(key: str) -> Session:
        if key not in made:
            made[key] = Session(tmp_path_factory.mktemp(re.sub(r"\W+", "-", key)))
        return made[key]

    return get


def _params():
    for b in BLOCKS:
        yield pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow else [])


@pytest.mark.parametrize("block", list(_params()))
def test_guide_example_runs(block: Block, sessions):
    s = sessions(block.session)
    chain = SESSIONS[block.session]
    for b in chain[:chain.index(block) + 1]:  # what the reader ran before, then this block
        if s.failed:
            pytest.fail(f"{block.id}: an earlier block of its session failed: {s.failed}",
                        pytrace=False)
        if b.id in s.done:
            continue
        try:
            run_block(b, s)
        except ExampleFailed as exc:
            s.failed = b.id
            pytest.fail(str(exc) if b is block else f"{block.id}: the earlier block {b.id} "
                        f"failed:\n{exc}", pytrace=False)
        s.done.add(b.id)


def test_the_guides_mark_their_runnable_examples():
    marked = {b.page for b in BLOCKS}
    for page in ("docs/guide/README.md", "docs/guide/chromatogram.md",
                 "docs/guide/schedules.md", "docs/guide/own-images.md",
                 "docs/guide/upsample-guidance.md"):
        assert page in marked, f"no runnable example in {page}"


# -- the examples of the --help texts -----------------------------------------------------------

def _walk(command, path: tuple[str, ...] = ("prism",)):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, (*path, name))


def help_examples() -> list[tuple[str, str]]:
    """(command path, example line) for every line under "Examples:" in a --help text (the
    command's epilog, or its docstring)."""
    top = typer.main.get_command(prism_cli.app)
    found = []
    for path, command in _walk(top):
        for text in (command.help or "", command.epilog or ""):
            lines = [ln.strip() for ln in text.splitlines()]
            if "Examples:" in lines:
                found += [(" ".join(path), ln) for ln in lines[lines.index("Examples:"):]
                          if ln.startswith("prism ")]
    return found


HELP = help_examples()


def _parse(args: list[str]):
    """Parse a command line with the real command tree, without running it (the context of
    the leaf command)."""
    command = typer.main.get_command(prism_cli.app)
    ctx = command.make_context("prism", list(args))
    while hasattr(command, "commands"):  # a group: the sub-command and its arguments
        protected = getattr(ctx, "_protected_args", None)  # click >= 8.2; before: protected_args
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def test_every_leaf_command_has_an_example():
    top = typer.main.get_command(prism_cli.app)
    leaves = {" ".join(p) for p, c in _walk(top) if not hasattr(c, "commands")}
    assert leaves - {cmd for cmd, _ in HELP} == set()


@pytest.mark.parametrize("command,example", HELP, ids=[e for _, e in HELP])
def test_help_example_parses(command, example):
    assert example.startswith(command + " ") or example == command, \
        f"`{command} --help` shows an example of another command: {example}"
    ctx = _parse(shlex.split(example)[1:])
    assert ctx.command_path.split()[1:] == command.split()[1:]


@pytest.mark.parametrize("example", [
    pytest.param(e, marks=[pytest.mark.slow] if e.startswith(SLOW_HELP) else [])
    for c, e in HELP if c.startswith(RUN_HELP)])
def test_help_example_runs(example, tmp_path):
    command = next(c for c, e in HELP if e == example)
    s = Session(tmp_path)
    res = s.shell(example)
    if res.returncode != 0:
        pytest.fail(_report(f"`{command} --help`", example, res, f"exited {res.returncode}"),
                    pytrace=False)
