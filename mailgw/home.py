"""The shipped defaults (``config/ filters/ templates/``) and ``mailgw init``."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import mailgw

SHIPPED = ("config", "filters", "templates")


def defaults_dir() -> Path:
    """Where the shipped defaults are: inside an installed wheel, or the source checkout."""
    pkg = Path(mailgw.__file__).resolve().parent
    for candidate in (pkg / "_defaults", pkg.parent):
        if (candidate / "config" / "mailgw.yaml").is_file():
            return candidate
    raise FileNotFoundError("the shipped default config is missing from this installation")


def init_home(target: Path, *, exist_ok: bool = False) -> list[Path]:
    """Copy the shipped defaults into ``target``; existing files are never overwritten."""
    if (target / "config" / "mailgw.yaml").exists() and not exist_ok:
        raise FileExistsError(f"{target} already holds a mailgw home (config/mailgw.yaml)")
    src = defaults_dir()
    written = []
    for part in SHIPPED:
        for f in sorted((src / part).rglob("*")):
            if f.is_dir() or "__pycache__" in f.parts:
                continue
            dest = target / f.relative_to(src)
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
            written.append(dest)
    (target / "store").mkdir(parents=True, exist_ok=True)
    config = target / "config" / "mailgw.yaml"
    if config in written:
        # A key of this home's own for VERP tokens and signed Message-IDs (docs/machine-mail.md).
        with open(config, "a", encoding="utf-8") as f:
            f.write("\n# Written by `mailgw init`: the HMAC key for VERP return paths and our\n"
                    "# Message-IDs. Keep it secret; use the same on every node.\n"
                    f"machine_mail:\n  secret: \"{secrets.token_urlsafe(32)}\"\n")
            # The key for agents' signed reply addresses (docs/agent-mail.md); agent mail
            # stays off until agents are configured.
            f.write("\n# Written by `mailgw init`: the key for agents' signed reply addresses\n"
                    "# (docs/agent-mail.md). Rotate: add a new key first, drop the old later.\n"
                    "agent_mail:\n  keys:\n"
                    f"    - {{id: k1, secret: \"{secrets.token_urlsafe(32)}\"}}\n")
    return written
