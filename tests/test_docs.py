"""The documents point at things that exist: links and their anchors, file paths, tools, tests. A file that
moves, a heading that is renamed or a test that is renamed shows here, not in a reader's 404."""
import re

import pytest

from conftest import ROOT

DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./-])((?:support|tools|tests|docs)/[\w./-]*\w)(?:::(\w+))?")
TOOL = re.compile(r"python -m tools\.(\w+)")
STALE = {  # what a reader would type from an old page, and where it went
    re.compile(r"python data\.py"): "python -m tools.inspect_data",
    re.compile(r"(?<![\w/.-])bench\.py"): "tools/bench.py (python -m tools.bench)",
    re.compile(r"from (lora|checkpoint|packing|distributed|hub|chat|demo|fileio|errors) import"): "from support.X import",
    re.compile(r"(?<![\w/.-])(?:" + "|".join(sorted(p.stem for d in ("support", "tools") for p in (ROOT / d).glob("*.py")
                                                 if p.stem != "__init__")) + r")\.py"): "named by its path: support/X.py, tools/X.py",
}
README_ORDER = ["Two commands", "Read the code", "Train a real reward model", "Evaluate", "Export", "Use it in RL",
                "Performance"]


def anchors(path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (lowercase, punctuation dropped, spaces -> '-')."""
    out, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        in_code ^= line.startswith("```")
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def prose(path) -> str:
    return path.read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(doc):
    broken = []
    for target in LINK.findall(prose(doc)):
        if re.match(r"\w+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_tools_and_tests_named_exist(doc):
    text, missing = prose(doc), []
    for path, test in PATH.findall(text):
        if "*" in path or path.endswith("/") or not (ROOT / path).suffix:
            continue  # a directory or a pattern
        if not (ROOT / path).exists():
            missing.append(path)
        elif test and not re.search(rf"def {test}\b", (ROOT / path).read_text()):
            missing.append(f"{path}::{test}")
    missing += [f"python -m tools.{name}" for name in TOOL.findall(text) if not (ROOT / "tools" / f"{name}.py").exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stale_commands(doc):
    text = prose(doc)
    stale = [f"{m.group(0)!r} (now {now})" for pattern, now in STALE.items() for m in pattern.finditer(text)]
    assert not stale, f"{doc.relative_to(ROOT)}: {stale}"


def test_readme_is_a_newcomers_page():
    """About 200 lines, in the order a newcomer needs: the commands first, the reference in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 240, f"README.md has {len(lines)} lines; move reference material to docs/"
    headings = [line[3:] for line in lines if line.startswith("## ")]
    order = [h for h in headings if h in README_ORDER]
    assert order == README_ORDER, headings
    assert headings.index("Two commands") == 0, headings


def test_readme_names_every_support_module_and_tool():
    """The README's table is where a reader finds the machinery: a new module gets its row."""
    readme = (ROOT / "README.md").read_text()
    modules = sorted(str(p.relative_to(ROOT)) for d in ("support", "tools") for p in (ROOT / d).glob("*.py")
                     if p.name != "__init__.py")
    missing = [m for m in modules if f"`{m}`" not in readme]
    assert not missing, f"README.md's 'Read the code' table does not name {missing}"


def test_flags_md_names_every_flag(capsys):
    """docs/flags.md is the full flag reference: a flag added to train.py or eval.py gets its row."""
    import eval as eval_cli
    import train
    flags = set()
    for parse in (train.parse_command_line, eval_cli.parse_args):
        with pytest.raises(SystemExit):
            parse(["-h"])
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("  -"):  # an option line: its names, then (two spaces on) its help
                flags.update(re.findall(r"--[\w]+", re.split(r"\s{2,}", line.strip())[0]))
    flags.discard("--help")
    assert len(flags) > 50, flags
    doc = (ROOT / "docs" / "flags.md").read_text()
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){f}(?!\w)", doc))
    assert not missing, f"docs/flags.md does not describe {missing}"
