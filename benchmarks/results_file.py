"""benchmarks/RESULTS.md holds one section per benchmark; a run replaces its own section and leaves the others."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def replace_section(heading: str, lines: list[str]) -> None:
    """Drop the section whose title starts with `heading` (up to the next `## `) and append `lines` in its place."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start].rstrip() + ("\n\n" + text[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines).rstrip() + "\n")
