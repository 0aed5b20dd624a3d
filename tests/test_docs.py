"""Every place that cites the design documents cites a heading that exists.

Comments and tests point at rules as ``docs/<file>.md#<anchor>``, and the documents
link to each other; a renamed heading must not leave a citation pointing nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# docs/design.md#the-spine anywhere; design.md#the-spine or #the-spine in a link.
_CITED = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
_LINKED = re.compile(r"\]\(([\w-]+\.md)?(?:#([\w-]+))?\)")


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = _FENCE.sub("", document.read_text(encoding="utf-8"))
    return {anchor(h) for h in _HEADING.findall(text)}


def citations() -> list[tuple[str, str, str | None]]:
    """(where, document, anchor) for every citation of a design document."""
    found: list[tuple[str, str, str | None]] = []
    sources = [*(ROOT / "relayd").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    sources += [ROOT / "README.md"]
    for path in sources:
        for match in _CITED.finditer(path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(ROOT)), match[1], match[2]))
    for path in DOCS.glob("*.md"):
        for match in _LINKED.finditer(path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(ROOT)), match[1] or path.name, match[2]))
    return found


def test_the_anchor_rule_matches_githubs() -> None:
    assert anchor("Files out: openaiFileResponse") == "files-out-openaifileresponse"
    assert anchor("A hang-up cancels upstream at once") == "a-hang-up-cancels-upstream-at-once"
    assert anchor("user_data files") == "user_data-files"


def test_the_design_documents_are_in_the_repository() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"design.md", "streaming.md", "chatgpt.md", "security.md"} <= names


@pytest.mark.parametrize(("where", "document", "target"), citations(), ids=lambda v: str(v))
def test_each_citation_names_an_existing_document_and_heading(
    where: str, document: str, target: str | None
) -> None:
    path = DOCS / document
    assert path.is_file(), f"{where} cites docs/{document}, which does not exist"
    if target is not None:
        assert target in anchors(path), f"{where} cites docs/{document}#{target}: no such heading"
