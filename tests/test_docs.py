"""The documentation works: its Python examples run, and the site builds with ``mkdocs build --strict``.

Every ```python block in docs/*.md and README.md runs, in order, in one namespace per page, in a fresh temporary
directory.  A block with ``await`` at its top level runs as the body of one coroutine (``asyncio.run``), as in
``python -m asyncio``.  A block that cannot run here (it needs a GPU or a cloud account) is marked with an HTML
comment on the line just before its opening fence, which says why::

    <!-- no-run: needs 8 CUDA GPUs -->
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

import ast
import asyncio
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
NO_RUN = re.compile(r"^<!-- no-run(?::\s*(.*?))? -->$")
S3 = "<!-- run: s3 -->"
CUDA = "<!-- run: cuda -->"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    no_run: str | None  # why the block does not run ("" when the marker gives no reason); None: it runs
    s3: bool = False
    cuda: bool = False

    @property
    def run(self) -> bool:
        """Whether it runs here (a ``run: cuda`` block runs only where a GPU is)."""
        return self.no_run is None and not self.cuda


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
        marker = NO_RUN.match(previous)
        out.append(Block(page, start + 1, lang.lower(), "\n".join(body) + "\n",
                         None if marker is None else marker.group(1) or "", previous == S3, previous == CUDA))
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
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- no-run: needs a GPU -->\n```python\nimport lightning\n```\n"
                    "```bash\nls\n```\n    ```python\n    y = 2\n    ```\n<!-- no-run -->\n```python\nz\n```\n"
                    "<!-- run: cuda -->\n```python\nz = 3\n```\n")
    found = blocks(page)
    assert [(b.lang, b.no_run, b.cuda, b.line) for b in found] == [
        ("python", None, False, 3), ("python", "needs a GPU", False, 8), ("bash", None, False, 11),
        ("python", None, False, 14), ("python", "", False, 18), ("python", None, True, 22)]
    assert found[3].code == "y = 2\n"
    assert [b.line for b in runnable(page)] == [3, 14] and [b.line for b in runnable(page, cuda=True)] == [3, 14, 22]


def test_every_block_that_does_not_run_says_why():
    silent = [f"{b.page.relative_to(ROOT)}:{b.line}" for page in PAGES for b in blocks(page) if b.no_run == ""]
    assert not silent, f"no-run markers without a reason (write <!-- no-run: why -->): {silent}"


def test_top_level_await_runs_in_one_coroutine(tmp_path, monkeypatch, request):
    page = tmp_path / "p.md"
    page.write_text("```python\nimport asyncio\nx = 1\n```\n\n```python\nawait asyncio.sleep(0)\n"
                    "y = x + 1\n```\n\n```python\nassert y == 2\n```\n")
    run_page(page, monkeypatch, request)
    page.write_text("```python\nimport asyncio\nawait asyncio.sleep(0)\nassert False, 'ran'\n```\n")
    with pytest.raises(AssertionError, match="line 1 fails: AssertionError: ran"):
        run_page(page, monkeypatch, request)


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
        where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
        try:
            code = compile(block.code, f"{where}:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if code.co_flags & inspect.CO_COROUTINE:
                asyncio.run(eval(code, namespace))  # top-level await: the block is one coroutine's body
            else:
                exec(code, namespace)
        except Exception as exc:
            raise AssertionError(
                f"the example at {where} line {block.line} fails: {type(exc).__name__}: {exc}\n"
                f"(mark it with <!-- no-run: why --> on the line before its fence if it cannot run here)") from exc


def test_configuration_page_lists_every_engine_option():
    import asyncckpt

    text = (ROOT / "docs" / "configuration.md").read_text()
    options = [name for name, p in inspect.signature(asyncckpt.CheckpointEngine).parameters.items()
               if p.kind is p.KEYWORD_ONLY]
    assert options
    for name in options:
        assert f"| `{name}` |" in text, f"docs/configuration.md does not describe {name}"


def test_api_reference_covers_every_public_name():
    import asyncckpt
    import asyncckpt.dcp
    import asyncckpt.lightning

    text = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^::: (\S+)", text, re.M))  # generated from the docstrings
    listed |= set(re.findall(r"^- `(asyncckpt\.lightning\.\w+)", text, re.M))  # built at run time: described
    listed |= set(re.findall(r"`(asyncckpt\.__version__)`", text))
    missing = [f"{module.__name__}.{name}" for module in (asyncckpt, asyncckpt.dcp, asyncckpt.lightning)
               for name in module.__all__ if f"{module.__name__}.{name}" not in listed]
    assert not missing, f"docs/api.md has no entry for {missing}"

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


# ---------------------------------------------------------------- docstrings of the public API

SECTION = re.compile(r"^(\w[\w ]*):\s*$")
ENTRY = re.compile(r"^    (\*{0,2}[\w.~]+)\s*(?:\([^)]*\))?:")
NO_VALUE = {"None", "NoReturn", "Iterator[None]", "Generator[None, None, None]"}


def public_objects() -> dict[str, object]:
    """Every name the API reference documents, by dotted name: the package root's ``__all__``, ``asyncckpt.dcp``'s,
    and what docs/api.md pulls in with ``::: name``, and the behaviour of the Lightning classes built at run time
    (their mixins, which `help()` shows on them)."""
    import importlib

    import asyncckpt
    import asyncckpt.dcp

    names = {f"{m.__name__}.{n}" for m in (asyncckpt, asyncckpt.dcp) for n in m.__all__ if not n.startswith("__")}
    names |= set(re.findall(r"^::: (\S+)", (ROOT / "docs" / "api.md").read_text(), re.M))
    names |= {f"asyncckpt.lightning.{kind}Mixin" for kind in ("AsyncCheckpointIO", "NativeCheckpointIO",
                                                             "AsyncFSDPStrategy", "AsyncModelParallelStrategy")}
    found = {}
    for name in sorted(names):
        module, _, attr = name.rpartition(".")
        found[name] = getattr(importlib.import_module(module), attr)
    return found


def section_lines(doc: str) -> dict[str, list[str]]:
    """A Google-style docstring's sections (``Args``, ``Returns``…), each with its lines."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in doc.splitlines():
        if m := SECTION.match(line):
            current = out.setdefault(m.group(1), [])
        elif line and not line.startswith(" "):
            current = None
        elif current is not None:
            current.append(line)
    return out


def sections(doc: str) -> dict[str, list[str]]:
    """A Google-style docstring's sections, each with the names its entries start with."""
    return {title: [m.group(1).lstrip("*~").rsplit(".", 1)[-1] for line in lines if (m := ENTRY.match(line))]
            for title, lines in section_lines(doc).items()}


def raised(fn: object) -> set[str]:
    """The exception classes ``fn`` raises by name (``raise SomeError(...)``), its nested functions included;
    private ones (DCP's carrier) and re-raises of a caught value are not part of what a caller sees."""
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id[:1].isupper():
                names.add(exc.id)
    return names


def own_doc(obj: object) -> str | None:
    """``obj``'s own docstring, cleaned: not one inherited from a base class (torch's, for DCP's protocol), which
    ``help()`` shows but the API reference does not."""
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else None


def doc_problems(where: str, fn: object, doc: str | None, skip_first: bool, raises: object = None) -> list[str]:
    """What the docstring of the function or method ``fn`` lacks: an ``Args`` entry for each parameter, ``Returns``
    (``Yields``) when it returns a value, a ``Raises`` entry for each exception it (or ``raises``) raises by name."""
    if not doc:
        return [f"{where}: no docstring"]
    found, problems = sections(doc), []
    params = list(inspect.signature(fn).parameters.values())[1 if skip_first else 0:]  # type: ignore[arg-type]
    documented = set(found.get("Args", [])) | set(found.get("Attributes", []))
    missing = [p.name for p in params if p.name not in documented]
    if missing:
        problems.append(f"{where}: Args lacks {', '.join(missing)}")
    returns = inspect.signature(fn).return_annotation  # type: ignore[arg-type]
    if returns is not inspect.Signature.empty and str(returns) not in NO_VALUE and not (
            "Returns" in found or "Yields" in found):
        problems.append(f"{where}: no Returns section (it returns {returns})")
    for title in ("Returns", "Yields"):  # each line at the item indent is another item to mkdocstrings
        if sum(1 for line in section_lines(doc).get(title, []) if re.match(r"^    \S", line)) > 1:
            problems.append(f"{where}: {title} reads as several items: indent its continuation lines")
    undeclared = sorted(raised(fn if raises is None else raises) - set(found.get("Raises", [])))
    if undeclared:
        problems.append(f"{where}: Raises lacks {', '.join(undeclared)}")
    return problems


def member_problems(cls: type, seen: set[str]) -> list[str]:
    """The docstring problems of ``cls``'s constructor and of every public method and property it has from a class
    of this package (each defining class's member checked once)."""
    import dataclasses

    problems = []
    name = f"{cls.__module__}.{cls.__qualname__}"
    doc = own_doc(cls) or ""
    if dataclasses.is_dataclass(cls):  # its fields are its arguments; __post_init__ checks them
        problems += doc_problems(name, cls, doc, False, cls.__dict__.get("__post_init__", lambda: None))
    elif "__init__" in cls.__dict__:  # merge_init_into_class: the class documents its arguments
        init = cls.__dict__["__init__"]
        problems += doc_problems(name, init, doc + "\n\n" + (own_doc(init) or ""), True)
    for klass in cls.__mro__:
        if not klass.__module__.startswith("asyncckpt") or klass.__name__ == "Protocol":
            continue
        for attr, value in vars(klass).items():
            key = f"{klass.__module__}.{klass.__qualname__}.{attr}"
            if attr.startswith("_") or key in seen or (klass is not cls and hasattr(klass, "__dataclass_fields__")
                                                       and attr in klass.__dataclass_fields__):
                continue
            seen.add(key)
            if isinstance(value, property):
                if not value.__doc__:
                    problems.append(f"{key}: no docstring")
                elif undeclared := sorted(raised(value.fget) - set(sections(own_doc(value) or "").get("Raises", []))):
                    problems.append(f"{key}: Raises lacks {', '.join(undeclared)}")
            elif isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value):
                fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if fn.__name__ != attr:  # a hook set from elsewhere (CheckpointEngine.rank_face), not a method
                    continue
                problems += doc_problems(key, fn, own_doc(fn), not isinstance(value, staticmethod))
    return problems


def test_public_callables_document_args_returns_raises():
    problems: list[str] = []
    seen: set[str] = set()
    for name, obj in {id(obj): (name, obj) for name, obj in public_objects().items()}.values():  # SyncHandle
        if inspect.isclass(obj):
            if not issubclass(obj, BaseException) or "__init__" in obj.__dict__:
                problems += member_problems(obj, seen)
            elif not obj.__doc__:
                problems.append(f"{name}: no docstring")
        elif callable(obj):
            problems += doc_problems(name, obj, own_doc(obj), False)
    assert not problems, f"{len(problems)} docstring gaps:\n" + "\n".join(problems)


def test_docstring_sections_are_read():
    doc = "Do it.\n\nArgs:\n    path: where.\n    **kwargs (Any): more.\n\nRaises:\n    ~asyncckpt.S3Error: no.\n"
    assert sections(doc) == {"Args": ["path", "kwargs"], "Raises": ["S3Error"]}

    def f(path: str, **kwargs: int) -> int:
        if not path:
            raise InvalidArgumentError("no path")
        return 1

    assert doc_problems("f", f, doc, False) == ["f: no Returns section (it returns int)",
                                                "f: Raises lacks InvalidArgumentError"]
    doc += "\nReturns:\n    One,\n    or two.\n"
    assert doc_problems("f", f, doc, False) == ["f: Returns reads as several items: indent its continuation lines",
                                                "f: Raises lacks InvalidArgumentError"]
