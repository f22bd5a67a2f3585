"""The documentation (README.md and docs/) against the code: a short README, a page per provider, links that
resolve, paths that exist, and the documented commands that need no cloud, lab or root actually run.

Commands are taken from the docs' code (fenced blocks and `inline code`) and run as
``[sys.executable, "-m", "harness.cli", ...]`` (or ``-m <module>``) from the repository root.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 10_000  # bytes, as `wc -c` counts them
TIMEOUT = 60


def pages():
    return [README] + sorted(DOCS.rglob("*.md"))


def rel(path, root=ROOT):
    return path.relative_to(root).as_posix()


# ------------------------------------------------------------------------------------------ markdown
FENCE = re.compile(r"^(```|~~~)")
INLINE = re.compile(r"`([^`]+)`")


def split_code(text):
    """(prose lines, code snippets): the lines of fenced blocks (continuation lines joined) and inline code
    spans (which may run over a line break; table cells' escaped pipes unescaped)."""
    prose, code, block, fenced = [], [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if fenced:
                code.extend(join_continuations(block))
                block = []
            fenced = not fenced
            continue
        if fenced:
            block.append(line)
        else:
            prose.append(line)
    inline = INLINE.findall("\n".join(prose).replace("\\|", "|"))
    return prose, code + [" ".join(s.split("\n")) for s in inline]


def join_continuations(lines):
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text):
    prose, _ = split_code(text)
    seen, out = {}, set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(files, root=ROOT):
    """'file: target (reason)' for each relative link that points at no file, or at no heading of it."""
    bad = []
    for f in files:
        prose, _ = split_code(f.read_text())
        for target in LINK.findall(INLINE.sub("", "\n".join(prose))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                bad.append(f"{rel(f, root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.append(f"{rel(f, root)}: {target} (no such heading in {dest.name})")
    return bad


PATH = re.compile(r"^(?:harness|providers|gan|tests|terraform|results|docs|\.github|\.ci)/[\w./{},*-]*$")


def missing_paths(files, root=ROOT):
    """Repository paths named in inline code (`harness/lab/hosts.py`) that do not exist."""
    bad = []
    for f in files:
        for snippet in split_code(f.read_text())[1]:
            token = snippet.strip()
            if not PATH.match(token) or "*" in token or token.startswith("results/runs"):
                continue
            if any(re.fullmatch(r"[A-Z_]+", part) for part in token.split("/")):  # results/baselines/NAME
                continue
            for p in expand_braces(token):
                if not (root / p).exists():
                    bad.append(f"{rel(f, root)}: {p}")
    return bad


def expand_braces(token):
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [x for alt in m.group(1).split(",")
            for x in expand_braces(token[:m.start()] + alt + token[m.end():])]


# ------------------------------------------------------------------------------------------ commands
CLI = re.compile(r"(?:^|[\s(`\"'])(?:\.venv/bin/)?cloudbench\s+([a-z][\w-]*)(?:\s+([\w|\\-]+))?")
MODULE = re.compile(r"python3?\s+-m\s+([A-Za-z_]\w*(?:\.\w+)*)")


def documented_cli(snippets):
    """{subcommand: {action, ...}}: every `cloudbench X [Y]` in the docs' code (Y kept for all; the test
    uses it only where X has sub-actions)."""
    out = {}
    for s in snippets:
        for m in CLI.finditer(s):
            acts = out.setdefault(m.group(1), set())
            if m.group(2):
                acts.update(a for a in m.group(2).replace("\\", "").split("|") if a)
    return out


def documented_modules(snippets):
    return {m.group(1) for s in snippets for m in MODULE.finditer(s)}


def command_lines(snippets):
    """Whole `cloudbench ...` command lines from the docs' code, trailing comments dropped."""
    out = set()
    for s in snippets:
        line = re.sub(r"\s+#.*$", "", s.strip())
        line = re.sub(r"^\.venv/bin/", "", line)
        if line.startswith("cloudbench "):
            out.add(line)
    return out


PLACEHOLDER = re.compile(r"[<>\[\]|$]|\.\.\.|\bRUN_ID\b|\bRUN_DIR\b")


def needs_nothing(line):
    """A documented command that needs no cloud, lab or root, and writes nothing: the ones the test runs."""
    if PLACEHOLDER.search(line):
        return False
    argv = shlex.split(line)[1:]
    if not argv:
        return False
    if argv[0] == "providers":
        return True
    if argv[0] == "run" and "--dry-run" in argv:
        provider = argv[argv.index("--provider") + 1] if "--provider" in argv else "local"
        return provider == "local" or (provider == "kubernetes" and any("slots_per_worker=" in a for a in argv))
    if argv[0] == "regress" and "--junit" not in argv:  # against committed baselines only
        dirs = [a for a in argv[1:] if not a.startswith("-")]
        return bool(dirs) and all((ROOT / d / "samples.parquet").exists() for d in dirs)
    return False


def runnable(module):
    """python -m can run it: a module, or a package with a __main__."""
    spec = importlib.util.find_spec(module)
    return spec.submodule_search_locations is None or importlib.util.find_spec(module + ".__main__") is not None


def run(*argv):
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    out = p.stdout + p.stderr
    return p.returncode, out if len(out) <= 2500 else out[:500] + "\n...\n" + out[-2000:]


def run_all(argvs):
    """{argv: (exit code, output head and tail)}, a few at a time (each is a fresh interpreter)."""
    argvs = sorted(set(argvs))
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(argvs, pool.map(lambda a: run(*a), argvs)))


def cli_tree():
    """{subcommand: {action, ...}} of the real parser (actions only for commands that have them)."""
    import argparse

    from harness.cli import parser

    def subparsers(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                return a.choices
        return {}

    return {name: set(subparsers(p)) for name, p in subparsers(parser()).items()}


@pytest.fixture(scope="module")
def snippets():
    return [s for f in pages() for s in split_code(f.read_text())[1]]


# --------------------------------------------------------------------------------------------- tests
def test_readme_is_short_and_keeps_the_quick_start():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail into docs/"
    text = README.read_text()
    test_command = "bash harness/setup.sh --test && .venv/bin/python -m pytest"
    assert "bash harness/setup.sh && .venv/bin/cloudbench run\n" in text
    assert test_command + "\n" in text
    assert test_command in (ROOT / ".ci" / "run").read_text(), ".ci/run runs the README's test command"


def entry_point_providers():
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the section is plain `name = "module:Class"` lines
        m = re.search(r'^\[project\.entry-points\."cloudbench\.providers"\]\n(.*?)(?=^\[|\Z)', text, re.M | re.S)
        return sorted(re.findall(r"^([\w-]+)\s*=", m.group(1), re.M)) if m else []
    return sorted(tomllib.loads(text)["project"]["entry-points"]["cloudbench.providers"])


def test_every_provider_has_a_page():
    names = entry_point_providers()
    assert "local" in names and len(names) >= 8
    missing = [n for n in names if not (DOCS / "providers" / f"{n}.md").is_file()]
    assert missing == [], f"no docs/providers/<name>.md for {missing}"
    index = (DOCS / "providers.md").read_text() + README.read_text()
    unlinked = [n for n in names if f"providers/{n}.md" not in index]
    assert unlinked == [], f"provider pages not linked from README.md or docs/providers.md: {unlinked}"


def test_relative_links_point_to_existing_files_and_headings():
    assert broken_links(pages()) == []


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [rel(p) for p in sorted(DOCS.rglob("*.md")) if rel(p) not in text]
    assert unlinked == []


def test_repository_paths_named_in_the_docs_exist():
    assert missing_paths(pages()) == []


def test_the_checkers_catch_what_they_are_for(tmp_path):
    """A broken link, a missing heading, a stale path and an unknown command are all found."""
    (tmp_path / "b.md").write_text("# Real heading\n")
    a = tmp_path / "a.md"
    a.write_text("[ok](b.md#real-heading) [gone](c.md) [bad](b.md#nope) `[skip](c.md)`\n"
                 "```\n[in code](c.md)\n```\nsee `harness/lab.py` and `harness/lab/hosts.py`\n")
    (tmp_path / "harness" / "lab").mkdir(parents=True)
    (tmp_path / "harness" / "lab" / "hosts.py").write_text("")
    assert broken_links([a], tmp_path) == ["a.md: c.md (no such file)", "a.md: b.md#nope (no such heading in b.md)"]
    assert missing_paths([a], tmp_path) == ["a.md: harness/lab.py"]
    snips = split_code("run `cloudbench lab up|down` then\n```\ncloudbench nosuch --x \\\n  --y\n```\n")[1]
    assert documented_cli(snips) == {"lab": {"up", "down"}, "nosuch": {"--x"}}
    assert command_lines(snips) == {"cloudbench lab up|down", "cloudbench nosuch --x    --y"}
    assert not needs_nothing("cloudbench run --provider aws --dry-run")
    assert needs_nothing("cloudbench run --dry-run --provider local --gpus 2")
    assert slug("What `cloudbench run` prints") == "what-cloudbench-run-prints"


def test_every_cli_command_is_documented(snippets):
    documented = documented_cli(snippets)
    tree = cli_tree()
    assert sorted(set(tree) - set(documented)) == []
    for name, actions in tree.items():
        assert sorted(actions - documented[name]) == [], f"cloudbench {name}: undocumented actions"


def test_documented_commands_run(snippets):
    """`--help` of every documented subcommand (and action), of every documented project module and of every
    benchmark; then the documented commands that need no cloud (dry runs, providers, regress on baselines)."""
    documented = documented_cli(snippets)
    tree = cli_tree()
    argvs = [("-m", "harness.cli", "--help")]
    for name, actions in documented.items():
        argvs.append(("-m", "harness.cli", name, "--help"))  # an unknown name exits 2
        if tree.get(name):  # lab up, baseline save, ...: an unknown action exits 2 too
            argvs += [("-m", "harness.cli", name, a, "--help") for a in actions if re.fullmatch(r"[a-z]+", a)]

    modules = documented_modules(snippets)
    not_found = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not_found == [], f"documented `python -m` modules that do not exist: {not_found}"
    bench = {f"harness.bench.{p.stem}" for p in (ROOT / "harness" / "bench").glob("*.py") if p.stem != "__init__"}
    assert {m for m in modules if m.startswith("harness.bench.")} <= bench
    # gan.* import TensorFlow before parsing (seconds each): they are only checked to exist, above.
    # gan.sysinfo has no --help: it collects and prints its JSON (seconds too).
    for m in sorted((modules | bench) - {"gan.sysinfo"}):
        if m.split(".")[0] in ("harness", "providers") and runnable(m):
            argvs.append(("-m", m, "--help"))

    lines = command_lines(snippets)
    assert "cloudbench run --dry-run --provider local --gpus 2" in lines
    safe = sorted(line for line in lines if needs_nothing(line))
    assert len(safe) >= 3, safe
    argvs += [("-m", "harness.cli", *shlex.split(line)[1:]) for line in safe]

    results = run_all(argvs)
    failed = {" ".join(a): out for a, (code, out) in results.items() if code != 0}
    assert failed == {}
    for a, (code, out) in results.items():
        if a[1].startswith("harness.bench.") and a[2:] == ("--help",):
            assert "usage" in out.lower()


def test_benchmarks_print_their_machine_first():
    from harness.bench import machine_line

    line = machine_line()
    assert line.startswith("# machine: ") and "cores visible" in line and "\n" not in line
