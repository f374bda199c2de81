"""The documentation names everything a user can type, set or scrape, and every source file: each `reskd`
subcommand and each of its long options (read from the argparse parser reskd/cli.py builds), each RESKD_*
setting (read from the pydantic-settings classes), each metric the server exposes (read from the metrics
registry) and each Python module of the installed packages, named by its path. Names are searched in README.md
and docs/*.md together. Links between those files (and their #anchors) must resolve, and README.md's map of the
docs must list every docs/*.md file."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from reskd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The top-level source folders and the packages they install as (pyproject.toml, [tool.setuptools] package-dir).
PACKAGES = {"reskd": "reskd", "training": "reskd.training", "export": "reskd.export", "service": "reskd.service",
            "scoring": "reskd.scoring"}
# Where each subcommand's options are documented: a table under a heading that names `reskd SUBCOMMAND`.
OPTIONS_DOC = {"train": "docs/training.md", "sweep": "docs/training.md", "device-train": "docs/training.md",
               "export": "docs/export.md", "compose": "docs/export.md", "calibrate": "docs/export.md",
               "serve": "docs/serving.md", "score": "docs/scoring.md"}
NEW_DOC = "its doc, and name that doc in OPTIONS_DOC of tests/test_docs.py"  # for a subcommand OPTIONS_DOC lacks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def doc_text() -> str:
    return "\n".join(path.read_text() for path in doc_files())


def doc_texts() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in doc_files()}


def named(term: str, text: str) -> bool:
    """`term` occurs as a whole name: not as part of a longer flag, setting, metric or path (`--pack` is not named
    by `--pack-every`, `reskd_flops_total` not by `reskd_teacher_flops_total`, `reskd/cli.py` not by
    `bench/reskd/cli.py`)."""
    return re.search(rf"(?<![\w/.:-]){re.escape(term)}(?![\w/:-])", text) is not None


def undocumented(terms, text: str) -> list[str]:
    return sorted(term for term in set(terms) if not named(term, text))


def sections(text: str) -> list[str]:
    """Markdown text split at its headings (a `#` line inside a code fence is no heading)."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line) and current:
            out.append("\n".join(current))
            current = []
        current.append(line)
    out.append("\n".join(current))
    return out


# --- what there is to document, read from the code ---------------------------------------------------------------

def subcommands() -> dict[str, list[str]]:
    """`reskd` subcommand -> its long options (--help aside), as the parser reskd/cli.py builds has them."""
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sorted({option for a in sub._actions if not isinstance(a, argparse._HelpAction)
                          for option in a.option_strings if option.startswith("--")})
            for name, sub in action.choices.items()}


def settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic-settings class of the source folders: the modules that mention BaseSettings are imported and
    their subclasses of it collected."""
    classes = []
    for path in source_files():
        if "BaseSettings" not in path.read_text():
            continue
        module = importlib.import_module(module_name(path))
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, BaseSettings) and c is not BaseSettings and c.__module__ == module.__name__]
    return classes


def settings_variables() -> list[str]:
    """RESKD_<FIELD> for every field of every settings class whose environment prefix is RESKD_."""
    names = []
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        if prefix.upper().startswith("RESKD_"):
            names += [(prefix + field).upper() for field in cls.model_fields]
    return names


def exposed_metrics() -> list[str]:
    """The name of every metric family a server's /metrics exposes, as a scrape shows it: a counter with its _total
    (prometheus_client keeps the family's name without it), a histogram by its base name (its series add _bucket,
    _sum and _count)."""
    from reskd.service.serving.metrics import Metrics

    metrics = Metrics()
    metrics.describe_models(lambda: [], lambda: [])  # the families read from the routing table at each scrape
    return [family.name + ("_total" if family.type == "counter" else "") for family in metrics.registry.collect()]


def source_files() -> list[Path]:
    """Every Python module of the source folders but the packages' __init__.py."""
    return sorted(path for folder in PACKAGES for path in (ROOT / folder).rglob("*.py")
                  if path.name != "__init__.py" and "__pycache__" not in path.parts)


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([PACKAGES[folder], *rest])


def source_paths() -> list[str]:
    return [path.relative_to(ROOT).as_posix() for path in source_files()]


# --- the checks ----------------------------------------------------------------------------------------------------

def report(missing: list[str], what: str, where: str) -> str:
    return (f"{len(missing)} {what} not named anywhere in README.md or docs/*.md: {', '.join(missing)}. "
            f"Document each ({where}), with what it does.")


def options_missing(commands: dict[str, list[str]], docs: dict[str, str]) -> dict[str, list[str]]:
    """Subcommand -> its options not named in a section that names `reskd SUBCOMMAND` of the doc OPTIONS_DOC gives
    it (of any doc for a subcommand it does not list), and `reskd SUBCOMMAND` itself when no such section exists."""
    out = {}
    for command, options in commands.items():
        text = docs[OPTIONS_DOC[command]] if command in OPTIONS_DOC else "\n".join(docs.values())
        own = "\n".join(s for s in sections(text) if named(f"reskd {command}", s))
        missing = undocumented(options, own) if own else [f"reskd {command}", *options]
        if missing:
            out[command] = missing
    return out


def test_every_subcommand_and_option_is_documented():
    commands = subcommands()
    assert {"train", "sweep", "device-train", "export", "compose", "calibrate", "serve", "score"} <= set(commands)
    text = doc_text()
    missing = undocumented([f"reskd {c}" for c in commands], text)
    assert not missing, report(missing, "subcommands", "the table in README.md, \"The commands\"")
    missing = undocumented({option for options in commands.values() for option in options}, text)
    assert not missing, report(missing, "options", "the subcommand's options table")


def test_each_subcommands_options_are_documented_under_it():
    """An option shared by several subcommands (--device, --out, --repo) counts for each only where that
    subcommand's options are documented: in its doc (OPTIONS_DOC), in a section whose text names
    `reskd SUBCOMMAND` (its options table's heading does)."""
    missing = options_missing(subcommands(), doc_texts())
    assert not missing, "options not named in any section that names their subcommand: " + "; ".join(
        f"reskd {c}: {', '.join(m)} (add them to the `reskd {c}` table of {OPTIONS_DOC.get(c, NEW_DOC)})"
        for c, m in missing.items())


def test_every_setting_is_documented():
    variables = settings_variables()
    assert "RESKD_WORKERS" in variables and "RESKD_REPO" in variables
    missing = undocumented(variables, doc_text())
    assert not missing, report(missing, "settings", "docs/serving.md, the table under \"Settings\"")


def test_every_exposed_metric_is_documented():
    metrics = exposed_metrics()
    assert "reskd_requests_total" in metrics and "reskd_request_duration_seconds" in metrics
    assert "reskd_model_info" in metrics  # a family read from the routing table at each scrape
    missing = undocumented(metrics, doc_text())
    assert not missing, report(missing, "metrics", "docs/design.md, the table under \"Metrics\"")


def test_every_source_file_is_documented():
    paths = source_paths()
    assert "service/rest/kserve.py" in paths and "reskd/cli.py" in paths
    missing = undocumented(paths, doc_text())
    assert not missing, report(missing, "source files", "docs/design.md, \"Source files\", by path from the "
                                                        "repository root")


def test_the_checks_report_what_is_not_documented():
    """Each check can fail: a name planted beside the real ones, in the same checking functions, is reported
    missing, and only it."""
    text = doc_text()
    commands = subcommands()
    commands["serve"] = [*commands["serve"], "--no-such-flag"]
    commands["no-such-command"] = ["--out"]
    assert options_missing(commands, doc_texts()) == {"serve": ["--no-such-flag"],
                                               "no-such-command": ["reskd no-such-command", "--out"]}
    assert undocumented([f"reskd {c}" for c in commands], text) == ["reskd no-such-command"]
    assert undocumented([*settings_variables(), "RESKD_NO_SUCH_SETTING"], text) == ["RESKD_NO_SUCH_SETTING"]
    assert undocumented([*exposed_metrics(), "reskd_no_such_metric_total"], text) == ["reskd_no_such_metric_total"]
    assert undocumented([*source_paths(), "service/rest/no_such_module.py"], text) == [
        "service/rest/no_such_module.py"]
    # Whole names only: a longer name does not document a shorter one.
    assert not named("--pack", "`--pack-every SECONDS`") and named("--pack", "`--pack DIR` and `--pack-every`")
    assert not named("reskd_flops_total", "rate(reskd_teacher_flops_total[5m])")
    assert not named("RESKD_MAX_QUEUE_DELAY_MS", "`RESKD_STAGE_MAX_QUEUE_DELAY_MS`")
    assert not named("reskd/cli.py", "bench/reskd/cli.py") and named("reskd/cli.py", "(`reskd/cli.py`).")


def test_the_counts_read_from_the_code():
    """What the checks above cover, so that a reader of the test log sees they are not empty."""
    commands = subcommands()
    assert sum(map(len, commands.values())) >= 50
    assert len(settings_variables()) >= 35
    assert len(exposed_metrics()) >= 20
    assert len(source_paths()) >= 60


# --- links ---------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for section in sections(path.read_text()):
        heading = section.splitlines()[0]
        if not re.match(r"#{1,6} ", heading):
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.lstrip("#").strip())
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(doc):
    """Relative links of README.md and docs/*.md point at files that exist, and at headings that exist."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading with anchor #{anchor} in {path.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_readme_maps_every_doc():
    readme = (ROOT / "README.md").read_text()
    unlisted = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name})" not in readme]
    assert not unlisted, f"docs not in README.md's map (\"Documentation\", one line each): {', '.join(unlisted)}"


def test_the_link_check_catches_a_broken_anchor():
    assert "using-the-server" in anchors(DOCS / "serving.md")
    assert "schedulers-reskd_scheduler" in anchors(DOCS / "serving.md")
    assert "no-such-heading" not in anchors(DOCS / "serving.md")
