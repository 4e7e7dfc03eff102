"""The documentation works: its Python examples run, and the site builds with ``mkdocs build --strict``.

Every ```python block in docs/*.md and README.md runs, in order, in one namespace per page, in a fresh temporary
directory.  A block that cannot run here (it needs a Trainer, S3, XLA, or is a fragment) is marked with an HTML
comment on the line just before its opening fence::

    <!-- no-run -->
    ```python
    trainer.fit(model)
    ```

A block marked ``<!-- run: s3 -->`` runs against the suite's moto S3 server: ``AWS_ENDPOINT_URL`` and dummy
credentials point every S3 client at it, and the bucket ``my-bucket`` exists, so the block reads as it would for a
user with real credentials.

A block marked ``<!-- run: cuda -->`` needs a GPU (Lightning's FSDP refuses the CPU): the device test
``test_cuda_examples_run`` runs its page with it where a CUDA device is lent, in a fresh process group.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [p for p in [ROOT / "README.md"] if p.exists()]
NO_RUN = "<!-- no-run -->"
S3 = "<!-- run: s3 -->"
CUDA = "<!-- run: cuda -->"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    run: bool
    s3: bool = False
    cuda: bool = False


def blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a Markdown page, with whether each is meant to run."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i, previous = [], 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        out.append(Block(page, start + 1, lang.lower(), "\n".join(body) + "\n", previous not in (NO_RUN, CUDA),
                         previous == S3, previous == CUDA))
        previous = ""
        i += 1
    return out


def runnable(page: Path, cuda: bool = False) -> list[Block]:
    """The Python blocks that run here (with ``cuda``, those that need a GPU too, in page order)."""
    return [b for b in blocks(page) if b.lang in ("python", "py") and (b.run or cuda and b.cuda)]


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"index.md", "getting-started.md", "concepts.md", "configuration.md", "migration.md", "cli.md"} <= names


def test_block_parser_honours_the_marker(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- no-run -->\n```python\nimport lightning\n```\n"
                    "```bash\nls\n```\n    ```python\n    y = 2\n    ```\n<!-- run: cuda -->\n```python\nz = 3\n```\n")
    found = blocks(page)
    assert [(b.lang, b.run, b.cuda, b.line) for b in found] == [
        ("python", True, False, 3), ("python", False, False, 8), ("bash", True, False, 11),
        ("python", True, False, 14), ("python", False, True, 18)]
    assert found[3].code == "y = 2\n"
    assert [b.line for b in runnable(page)] == [3, 14] and [b.line for b in runnable(page, cuda=True)] == [3, 14, 18]


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: p.name)
def test_examples_run(page, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    run_page(page, monkeypatch, request)


@pytest.mark.cuda
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.cuda for b in blocks(p))], ids=lambda p: p.name)
def test_cuda_examples_run(page, tmp_path, monkeypatch, request):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.chdir(tmp_path)
    run_page(page, monkeypatch, request, cuda=True)


def drop_process_group() -> None:
    """End the process group a Trainer of the page made (Lightning leaves it for the next Trainer of the process)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_page(page: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, cuda: bool = False
             ) -> None:
    environ = dict(os.environ)
    try:
        run_blocks(page, monkeypatch, request, cuda)
    finally:  # a page that ran a Trainer on a process group (the sharded recipes) leaves neither behind
        drop_process_group()
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)


def run_blocks(page: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, cuda: bool) -> None:
    namespace: dict = {"__name__": "__docs__"}
    for block in runnable(page, cuda):
        if block.cuda:  # a GPU recipe starts as its own script would: on a process group of its own backend
            drop_process_group()
        if block.s3:
            moto = request.getfixturevalue("moto")
            options = moto.options()
            monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
            monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
            client = moto.client()
            if "my-bucket" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket="my-bucket")
        try:
            exec(compile(block.code, f"{page.relative_to(ROOT)}:{block.line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(
                f"the example at {page.relative_to(ROOT)} line {block.line} fails: {type(exc).__name__}: {exc}\n"
                f"(mark it with {NO_RUN} on the line before its fence if it is not meant to run)") from exc


def test_configuration_page_lists_every_engine_option():
    import asyncckpt

    text = (ROOT / "docs" / "configuration.md").read_text()
    options = [name for name, p in inspect.signature(asyncckpt.CheckpointEngine).parameters.items()
               if p.kind is p.KEYWORD_ONLY]
    assert options
    for name in options:
        assert f"| `{name}` |" in text, f"docs/configuration.md does not describe {name}"


def test_cli_page_covers_every_command():
    from asyncckpt.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    text = (ROOT / "docs" / "cli.md").read_text()
    for name in commands:
        assert f"\n## {name}\n" in text, f"docs/cli.md has no section for `asyncckpt {name}`"


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "cli" / "index.html").exists()
