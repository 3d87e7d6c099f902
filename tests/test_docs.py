"""The README and the guides in docs/: every relative link and picture points to a file of the
repository, and the README's first screen names the commands a newcomer needs."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(document):
    missing = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (document.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
        elif not path.is_relative_to(ROOT):
            missing.append(f"{target} (outside the repository)")
    assert not missing, f"{document.name}: broken links {missing}"


def test_readme_first_screen_has_install_and_quick_start():
    text = (ROOT / "README.md").read_text()
    first = text[: text.index("## The commands")]
    for command in ("make demo", "make test", "requirements-gpu.txt", "build_lmdb.py", "train_unet.py",
                    "inference.py"):
        assert command in first, command
    assert "../shared" not in text


def test_every_guide_is_listed_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    for guide in DOCUMENTS[1:]:
        if guide.name != "README.md":
            assert f"({guide.name})" in index, guide.name
