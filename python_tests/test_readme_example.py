"""The README's "Using the ops in your own model" example, extracted from README.md and run as it
is, so that the documented code cannot drift from the ops."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Using the ops in your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one python block"
    return blocks[0]


def test_readme_ops_example_runs():
    namespace: dict = {}
    exec(compile(readme_example(), f"{README}:Using the ops in your own model", "exec"), namespace)
    # The example's own asserts ran; its outputs have the documented shapes.
    assert namespace["padded"].shape == (2, 12, 64) and namespace["packed"].shape == (21, 64)
