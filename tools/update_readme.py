"""Regenerate the README's configuration table from train_gpt.Config (tests fail when it is stale).

  python tools/update_readme.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402

HEADER = "| variable | default | meaning |"


def main() -> None:
    path = ROOT / "README.md"
    lines = path.read_text(encoding="utf-8").split("\n")
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = train_gpt.config_reference_markdown().split("\n")
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
