"""The documentation stays true as the code changes.

* Every Python block in ``docs/`` that follows a ``<!-- run -->`` line runs (CPU, one process, a 1 x 1 mesh);
  the blocks of one page share one namespace, in page order.
* Every public name in ``shiftlib.__all__`` has an API page with a mkdocstrings ``::: shiftlib.<name>`` entry,
  every ``:::`` entry names something that exists, and every option of the ``shiftlib`` command is on its page.
* Every error message that ``src/shiftlib`` raises is on the Troubleshooting page (its longest literal piece,
  verbatim), so a user who reads an error can find its fix.
* ``mkdocs build --strict`` passes (skipped when mkdocs is not installed; CI installs the ``docs`` extra).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shiftlib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "shiftlib"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

RUN_MARK = "<!-- run -->"
_RUN_BLOCK = re.compile(r"^<!-- run -->[ \t]*\n```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_DIRECTIVE = re.compile(r"^:::[ \t]+([\w.]+)", re.M)
MIN_FRAGMENT = 8  # literal pieces shorter than this ("{path}: {e}") only wrap another error's message


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def runnable_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _RUN_BLOCK.finditer(text)]


def pages_with_examples() -> dict[str, list[str]]:
    found = {}
    for page in pages():
        blocks = runnable_blocks(page.read_text())
        if blocks:
            found[page.relative_to(DOCS).as_posix()] = blocks
    return found


# -- runnable examples ----------------------------------------------------------------------------------------

_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    pages = json.load(sys.stdin)
    results = {}
    for page, blocks in pages.items():
        namespace = {"__name__": "__docs__"}
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                for i, block in enumerate(blocks):
                    exec(compile(block, f"docs/{page} (run block {i + 1})", "exec"), namespace)
            results[page] = None
        except BaseException:
            results[page] = out.getvalue() + traceback.format_exc()
    print("\\n@@RESULTS@@" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def example_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    """Run every page's examples in one fresh CPU process (one spawn for all pages): page -> traceback or None."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
        SHIFTLIB_HOME=str(tmp_path_factory.mktemp("shiftlib_home")),  # `--model tiny` writes its checkpoint here
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER], input=json.dumps(pages_with_examples()), capture_output=True, text=True,
        cwd=ROOT, env=env, timeout=300,
    )
    if "@@RESULTS@@" not in proc.stdout:
        pytest.fail(f"the docs example runner died (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])


@pytest.mark.parametrize("page", sorted(pages_with_examples()))
def test_docs_examples_run(page: str, example_results: dict[str, str | None]) -> None:
    error = example_results[page]
    assert error is None, f"a `{RUN_MARK}` example in docs/{page} fails:\n{error}"


def test_every_run_marker_is_followed_by_a_python_block() -> None:
    for page in pages():
        text = page.read_text()
        marks, blocks = text.count(RUN_MARK), len(runnable_blocks(text))
        assert marks == blocks, (
            f"docs/{page.relative_to(DOCS)} has {marks} `{RUN_MARK}` marks but {blocks} runnable blocks: put the mark "
            f"on the line right before a top-level ```python fence"
        )


def test_the_docs_have_runnable_examples() -> None:
    assert len(pages_with_examples()) >= 5


# -- API reference ----------------------------------------------------------------------------------------------

def api_directives() -> dict[str, str]:
    """``::: target`` -> the page that holds it, over all of docs/."""
    return {m.group(1): page.relative_to(DOCS).as_posix() for page in pages() for m in _DIRECTIVE.finditer(page.read_text())}


@pytest.mark.parametrize("name", sorted(shiftlib.__all__))
def test_every_public_name_has_an_api_page(name: str) -> None:
    page = api_directives().get(f"shiftlib.{name}", "")
    assert page.startswith("api/"), (
        f"shiftlib.{name} is public but has no API page: add docs/api/{name}.md with the line "
        f"`::: shiftlib.{name}` and list it under 'API reference' in mkdocs.yml"
    )


def resolve(target: str) -> object:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def test_every_api_entry_names_something_that_exists() -> None:
    for target, page in api_directives().items():
        try:
            resolve(target)
        except (ImportError, AttributeError) as e:
            pytest.fail(f"docs/{page} documents `{target}`, which does not exist ({e})")


def test_every_command_line_option_is_on_the_cli_page() -> None:
    cli = pytest.importorskip("shiftlib.cli")
    page = (DOCS / "api" / "cli.md").read_text()
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        assert f"## shiftlib {command}" in page, f"docs/api/cli.md has no section `## shiftlib {command}`"
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in page, f"`shiftlib {command} {option}` is not on docs/api/cli.md"


# -- error messages -----------------------------------------------------------------------------------------------

def _is_error(func: ast.expr) -> bool:
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith(("Error", "Exception", "Exit")) or name == "error"


def error_messages() -> list[tuple[str, str]]:
    """(``file:line``, longest literal piece) of every error built with a message in src/shiftlib."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and _is_error(node.func) and node.args):
                continue
            pieces = [n.value for n in ast.walk(node.args[0]) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            longest = max((p.strip() for p in pieces), key=len, default="")
            if len(longest) >= MIN_FRAGMENT:
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", longest))
    return found


def test_error_messages_are_found() -> None:
    assert len(error_messages()) >= 20


def test_every_error_message_is_in_troubleshooting() -> None:
    page = TROUBLESHOOTING.read_text()
    missing = [f"  {where}: {piece!r}" for where, piece in error_messages() if piece not in page]
    assert not missing, (
        "these error messages are not on docs/troubleshooting.md; add each one (the message as a user sees it, in a "
        "```text block, with its cause and fix):\n" + "\n".join(missing)
    )


# -- the site ---------------------------------------------------------------------------------------------------

def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
