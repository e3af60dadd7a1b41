"""`python -m benchmarks.results_doc` (`make performance-doc`): docs/performance.md's tables from the results.

Each `<!-- results:NAME -->` ... `<!-- /results -->` block of docs/performance.md gets the
contents of benchmarks/results/NAME.md, as `make profile`, `make bench-colocated` and
`make bench-doors` last wrote them, set-up and load included. A block whose results file is
missing says which target writes it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

__all__ = ["render", "write"]

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
RESULTS = REPO / "benchmarks" / "results"
TARGETS = {
    "colocated": "make bench-colocated",
    "profile": "make profile",
    "doors": "make bench-doors",
    "doors_door1": "python -m benchmarks.doors --loops own_loop,own_loop_pertensor,own_loop_vote,handwritten --name doors_door1",
}
_BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def write(out: Path, name: str, document: dict, markdown: str) -> None:
    """A benchmark's results: `out/name.json` (the document) and `out/name.md` (its tables)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)


def _demote(markdown: str) -> str:
    """Headings of a results file become bold lines, so they do not break the page's outline."""
    return re.sub(r"^#+ (.*)$", r"**\1**", markdown, flags=re.M)


def render(document: str, results: Path = RESULTS) -> str:
    """`document` with every results block replaced by its results file (or a note to run its target)."""

    def block(match: re.Match) -> str:
        name = match.group(2)
        path = results / f"{name}.md"
        if path.exists():
            body = _demote(path.read_text().strip())
        else:
            body = f"(No `benchmarks/results/{name}.md` yet: run `{TARGETS.get(name, 'its benchmark')}`.)"
        return match.group(1) + body + "\n" + match.group(4)

    return _BLOCK.sub(block, document)


def main() -> int:
    DOC.write_text(render(DOC.read_text()))
    print(f"written: {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
