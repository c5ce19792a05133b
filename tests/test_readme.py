"""README.md and the pages of docs/ are a contract: every command their fenced ``bash`` blocks show runs, on a
machine with no network and no GPU, and exits 0 or ends with an error sentence the page showing it shows; every
relative link of theirs points to a file (and a heading, where it names one) that exists.

Commands run as typed, from a fresh folder, in the forms that train nothing: ``python run.py ...`` with
``dry_run=true`` appended (the adapted model on the meta device), ``scripts/reproduce.py`` with ``--dry-run``
(its multirun commands), other scripts as they are. A ``make`` line runs as ``make -n`` (make's own dry run:
the target exists and its recipe expands), and the recipe's ``run.py`` and ``reproduce.py`` commands then run
as above (so ``make claims`` prints the claims sweep's planned multiruns); its other commands (the test suite,
this one; the benchmark, which trains for minutes and has no dry form) are only expanded.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The front door and the pages it links to: their commands and links are held to the same rules.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# The framework's headline usage (run.py's design card), run whether or not the README shows it.
HEADLINE = "python run.py dataset=fgvc method=partial_lora rank=16 -m seed=0..19"
# What the README's headline usage must show, as typed.
FRONT_DOOR = [HEADLINE, "make table5"]
# The machine the README promises to work on: its hub out of reach, no GPU, this checkout's package.
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                    "PYTHONPATH": str(ROOT)}


def page_commands(page: Path) -> list[str]:
    """Each command line of one page's fenced bash blocks (comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def shown_commands() -> list[str]:
    """Each command line of the fenced bash blocks of README.md, then of docs/*.md (each once, comments dropped),
    then the headline usage."""
    commands = list(dict.fromkeys(command for page in PAGES for command in page_commands(page)))
    return commands + ([HEADLINE] if HEADLINE not in commands else [])


def showing(command: str) -> list[Path]:
    """The pages whose bash blocks show the command (README.md for the headline usage it does not show)."""
    return [page for page in PAGES if command in page_commands(page)] or [README]


def dry_form(script: str, args: list[str]) -> list[str]:
    """What the test runs for ``python <script> ARGS``: the forms of run.py and reproduce.py that train nothing."""
    if Path(script).name == "run.py":
        args = [*args, "dry_run=true"]
    elif Path(script).name == "reproduce.py":
        split = args.index("--") if "--" in args else len(args)
        args = [*args[:split], "--dry-run", *args[split:]]
    return [sys.executable, str(ROOT / script), *args]


def without_variables(line: str) -> tuple[dict[str, str], list[str]]:
    """A shell line's leading ``VAR=value`` assignments, and its words after them."""
    words, variables = shlex.split(line), {}
    while words and re.fullmatch(r"\w+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        variables[name] = value
    return variables, words


def recipe_commands(make_args: list[str]) -> list[list[str]]:
    """The run.py and reproduce.py commands of what ``make ARGS`` would run, read from ``make -n`` (which must
    succeed), in their dry forms; the recipe's other lines are left out."""
    expanded = subprocess.run(["make", "-n", *make_args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                              timeout=60)
    assert expanded.returncode == 0, expanded.stderr
    commands = []
    for line in expanded.stdout.splitlines():
        words = without_variables(line)[1]
        if len(words) > 1 and Path(words[1]).name in ("run.py", "reproduce.py"):
            commands.append(dry_form(words[1], words[2:]))
    return commands


def run_shown(command: str, folder: Path) -> list[tuple[list[str], subprocess.CompletedProcess]]:
    """Run what the test runs for one shown command, each process from a fresh folder under ``folder``."""
    variables, words = without_variables(command)
    env = ENV | variables  # set for the command, as a shell does
    assert words[0] in ("python", "make"), f"the test does not know how to run {command!r}"
    runs = [dry_form(words[1], words[2:])] if words[0] == "python" else recipe_commands(words[1:])
    outcomes = []
    for index, run in enumerate(runs):
        (folder / str(index)).mkdir()
        outcomes.append((run, subprocess.run(run, capture_output=True, text=True, cwd=folder / str(index), env=env,
                                             timeout=300)))
    return outcomes


COMMANDS = shown_commands()


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """The selected shown commands, two at a time: a dry run is mostly imports, on one core."""
    params = [getattr(item, "callspec", None) for item in request.session.items if item.module is request.module]
    selected = [callspec.params["command"] for callspec in params if callspec and "command" in callspec.params]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {command: pool.submit(run_shown, command, tmp_path_factory.mktemp("readme"))
                   for command in selected}
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_documented(command: str, outcomes: dict[str, Future]):
    readme = "\n".join(page.read_text() for page in showing(command))
    for run, result in outcomes[command].result():
        last = (result.stderr.strip().splitlines() or [""])[-1]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.returncode == 0 or (result.returncode == 2 and last.startswith("error: ") and last in readme), (
            f"{shlex.join(run[1:])} exited {result.returncode}: {result.stderr[-3000:]}")


def slug(heading: str) -> str:
    """A Markdown heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(page: Path) -> str:
    """A page's text without its fenced blocks (a ``#`` comment there is no heading, a ``[x](y)`` no link)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, repeated ones numbered as GitHub numbers them."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.MULTILINE):
        anchor, index = slug(heading), 1
        while anchor in found:
            anchor, index = f"{slug(heading)}-{index}", index + 1
        found.add(anchor)
    return found


def relative_links(page: Path) -> list[str]:
    """The targets of a page's Markdown links that are not URLs (``#heading`` alone included)."""
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", prose(page))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_readme_and_docs_links_point_to_files(page: Path):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"


def test_readme_is_a_front_door_to_every_docs_page_and_the_headline_usage():
    links = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    assert PAGES[1:], "docs/ holds no page"
    assert [page.name for page in PAGES[1:] if page not in links] == [], "docs pages the README does not link"
    assert (ROOT / "ARCHITECTURE.md") in links
    assert [command for command in FRONT_DOOR if command not in page_commands(README)] == []
