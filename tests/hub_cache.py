"""Files laid out in a Hugging Face cache as huggingface_hub downloads them (docs, "Understand
caching"): ``models--{org}--{name}/refs/{branch}`` holds a commit hash, ``snapshots/{commit}/{file}``
links to ``blobs/{sha256}``. The ``hub_cache`` fixture (conftest.py) gives an empty, offline cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes],
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Write ``files`` as huggingface_hub would have downloaded them; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
