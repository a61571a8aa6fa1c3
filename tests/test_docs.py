"""The README and the pages under docs/: every relative link leads to a file that exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = [t for t in targets if not re.match(r"[a-z]+:|#", t)
              and not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"


def test_the_readme_s_config_is_what_make_train_runs():
    """Every value the README's one-screen config shows is configs/default.yaml's, so a
    recipe change that leaves the README behind fails here; it may leave keys out."""
    import yaml

    from picorl.config import flatten
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## A config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = flatten(yaml.safe_load(block))
    default = flatten(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))
    assert len(shown) >= 20
    assert {k: v for k, v in shown.items() if default.get(k, "absent") != v} == {}
