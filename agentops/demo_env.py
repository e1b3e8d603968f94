"""``python -m agentops.demo_env [PATH]``: the ``.env`` that ``make demo`` runs with.

The demo runs with DEBUG off, as a deployment does: Django's debug pages print the
settings and the environment, and the demo's are reachable by anyone who can reach its
port. DEBUG off needs a SECRET_KEY, so one is generated and kept in the file, and so
is the key that signs the trail's checkpoints (AGENTOPS_LINEAGE_SIGNING_KEY: outside the
database, as lineage.anchoring needs it; with DEBUG off none is made on first use).

A file this command wrote earlier (it starts with MARKER) is brought up to date: the
``DEBUG=true`` that earlier versions wrote is turned off, in a comment that says why.
A file a person wrote is theirs: it only gains a SECRET_KEY if it has none, and a
DEBUG it turns on is left on (``manage.py serve`` warns about it).

Plain Python, no Django: settings cannot load before the file has its key.
"""

from __future__ import annotations

import base64
import re
import secrets
import sys
from pathlib import Path

MARKER = "# Written by make demo"
DEBUG_ON = re.compile(r"\s*(export\s+)?DEBUG\s*=\s*['\"]?(1|true|yes|on)['\"]?\s*", re.IGNORECASE)
SECRET_KEY = re.compile(r"\s*(export\s+)?SECRET_KEY\s*=")
SIGNING_KEY = re.compile(r"\s*(export\s+)?AGENTOPS_LINEAGE_SIGNING_KEY(_FILE)?\s*=")


def demo_env(path: Path) -> list[str]:
    """Write or update ``path``; return what was changed, one line each."""
    ours = not path.exists() or path.read_text().startswith(MARKER)
    lines = path.read_text().splitlines() if path.exists() else [f"{MARKER}: the demo's settings."]
    changes: list[str] = []
    if ours:
        kept = []
        for line in lines:
            if DEBUG_ON.fullmatch(line):
                kept.append("# DEBUG=true was turned off by make demo: error pages would show")
                kept.append("# the settings and the environment. Set it only while debugging.")
                changes.append("turned DEBUG off")
            else:
                kept.append(line)
        lines = kept
        if not any(SIGNING_KEY.match(line) for line in lines):
            # An Ed25519 seed, as `manage.py lineage_checkpoint --new-key` prints one.
            seed = base64.b64encode(secrets.token_bytes(32)).decode()
            lines.append(f"AGENTOPS_LINEAGE_SIGNING_KEY={seed}")
            changes.append("wrote a key for the trail's checkpoints")
    if not any(SECRET_KEY.match(line) for line in lines):
        lines.append(f"SECRET_KEY={secrets.token_urlsafe(50)}")
        changes.append("wrote a SECRET_KEY")
    if changes:
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)  # it holds the key
    return changes


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else ".env")
    changes = demo_env(path)
    if changes:
        print(f"{path}: " + "; ".join(changes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
