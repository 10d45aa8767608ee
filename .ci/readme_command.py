"""Print one of the README's set-up commands, so that CI runs exactly what a new user reads.

``python .ci/readme_command.py demo`` prints the first ``bash`` block of the README's "Set-up" section,
``... test`` the second. Exits non-zero when the section or the block is missing.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
WHICH = {"demo": 0, "test": 1}


def setup_commands(text: str) -> list[str]:
    """Return the one-line commands of the ``bash`` blocks in the "Set-up" section, in order."""
    section = re.search(r"^## Set-up\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    if section is None:
        raise SystemExit(f"{README}: no '## Set-up' section")
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), flags=re.MULTILINE | re.DOTALL)
    return [" ".join(line.strip() for line in block.strip().splitlines()) for block in blocks]


def main() -> None:
    """Print the command named on the command line."""
    if len(sys.argv) != 2 or sys.argv[1] not in WHICH:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(WHICH)}}}")
    commands = setup_commands(README.read_text())
    index = WHICH[sys.argv[1]]
    if len(commands) <= index:
        raise SystemExit(f"{README}: the Set-up section has {len(commands)} bash block(s), expected 2")
    print(commands[index])


if __name__ == "__main__":
    main()
