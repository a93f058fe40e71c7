"""mkdocs hook: the site's landing page is the README, its links rewritten for the site.

One place per fact: ``docs/index.md`` holds only a marker and the site's own "Where to go
next" table; everything above it is ``README.md`` up to its "Documentation" section, read at
build time, with repository paths turned into site paths (``benchmarks/RESULTS.md`` is the
results page, ``docs/x`` is ``x``) and links to files the site does not hold (tests) turned
into code spans.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- README -->"
_REPO = Path(__file__).resolve().parents[1]


def readme_for_site(readme: str) -> str:
    """The README above its "Documentation" section, with links that work on the site."""
    text = readme.split("\n## Documentation", 1)[0].rstrip() + "\n"
    text = text.replace("](benchmarks/RESULTS.md", "](results.md")
    text = text.replace("[`benchmarks/RESULTS.md`](results.md)", "[Benchmark results](results.md)")
    text = re.sub(r"\]\(docs/", "](", text)
    # A link to a file outside the site (a test, a script) becomes its path in code.
    text = re.sub(r"(?<!!)\[([^\]]+)\]\(((?:tests|benchmarks|examples)/[^)#]+)\)", r"\1 (`\2`)", text)
    return text


def on_files(files: Any, config: Any, **_: Any) -> Any:
    """Add the README's images (kept beside the benchmark results that made them) to the site."""
    from mkdocs.structure.files import File

    for path in re.findall(r"!\[[^\]]*\]\((benchmarks/[^)]+)\)", (_REPO / "README.md").read_text()):
        files.append(File(path, src_dir=str(_REPO), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != "index.md" or MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, readme_for_site((_REPO / "README.md").read_text()))
