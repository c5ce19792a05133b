"""README.md is a contract: every command its fenced ``bash`` blocks show runs, on a machine with no network
and no GPU, and exits 0 or ends with an error sentence the README itself shows.

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
# The framework's headline usage (run.py's design card), run whether or not the README shows it.
HEADLINE = "python run.py dataset=fgvc method=partial_lora rank=16 -m seed=0..19"
# The machine the README promises to work on: its hub out of reach, no GPU, this checkout's package.
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                    "PYTHONPATH": str(ROOT)}


def shown_commands() -> list[str]:
    """Each command line of README.md's fenced bash blocks (comments dropped), then the headline usage."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands + ([HEADLINE] if HEADLINE not in commands else [])


def dry_form(script: str, args: list[str]) -> list[str]:
    """What the test runs for ``python <script> ARGS``: the forms of run.py and reproduce.py that train nothing."""
    if Path(script).name == "run.py":
        args = [*args, "dry_run=true"]
    elif Path(script).name == "reproduce.py":
        split = args.index("--") if "--" in args else len(args)
        args = [*args[:split], "--dry-run", *args[split:]]
    return [sys.executable, str(ROOT / script), *args]


def recipe_commands(make_args: list[str]) -> list[list[str]]:
    """The run.py and reproduce.py commands of what ``make ARGS`` would run, read from ``make -n`` (which must
    succeed), in their dry forms; the recipe's other lines are left out."""
    expanded = subprocess.run(["make", "-n", *make_args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                              timeout=60)
    assert expanded.returncode == 0, expanded.stderr
    commands = []
    for line in expanded.stdout.splitlines():
        words = shlex.split(line)
        while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value prefixes
            words.pop(0)
        if len(words) > 1 and Path(words[1]).name in ("run.py", "reproduce.py"):
            commands.append(dry_form(words[1], words[2:]))
    return commands


def run_shown(command: str, folder: Path) -> list[tuple[list[str], subprocess.CompletedProcess]]:
    """Run what the test runs for one shown command, each process from a fresh folder under ``folder``."""
    words = shlex.split(command)
    assert words[0] in ("python", "make"), f"the test does not know how to run {command!r}"
    runs = [dry_form(words[1], words[2:])] if words[0] == "python" else recipe_commands(words[1:])
    outcomes = []
    for index, run in enumerate(runs):
        (folder / str(index)).mkdir()
        outcomes.append((run, subprocess.run(run, capture_output=True, text=True, cwd=folder / str(index), env=ENV,
                                             timeout=300)))
    return outcomes


COMMANDS = shown_commands()


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """The selected shown commands, two at a time: a dry run is mostly imports, on one core."""
    selected = [item.callspec.params["command"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {command: pool.submit(run_shown, command, tmp_path_factory.mktemp("readme"))
                   for command in selected}
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_documented(command: str, outcomes: dict[str, Future]):
    readme = README.read_text()
    for run, result in outcomes[command].result():
        last = (result.stderr.strip().splitlines() or [""])[-1]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.returncode == 0 or (result.returncode == 2 and last.startswith("error: ") and last in readme), (
            f"{shlex.join(run[1:])} exited {result.returncode}: {result.stderr[-3000:]}")
