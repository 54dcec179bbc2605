"""Read the annotated hex examples out of docs/PROTOCOL.md, so tests check the doc verbatim.

A block is fenced as ```<kind> <name>; each line is hex bytes, then two or
more spaces, then a comment; the `=>` line is the expected verdict.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def doc_examples(kind: str = "msgpack-hex", text: str | None = None) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, verdict) for every ```<kind> block of the doc."""
    text = DOC.read_text() if text is None else text
    examples = {}
    for name, body in re.findall(rf"```{re.escape(kind)} (\S+)\n(.*?)```", text, re.S):
        hex_parts, verdict = [], None
        for line in body.splitlines():
            if line.startswith("=>"):
                verdict = line[2:].strip()
            elif line.strip():
                hex_parts.append(line.strip().split("  ", 1)[0])
        assert verdict is not None, f"example {name} has no => verdict line"
        assert name not in examples, f"example {name} appears twice"
        examples[name] = (bytes.fromhex(" ".join(hex_parts)), verdict)
    return examples
