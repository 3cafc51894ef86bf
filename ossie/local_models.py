"""The gpt-oss models on this machine, as `ossie list` shows them and `ossie rm` deletes them: the Hugging Face
cache's snapshots of gpt-oss repos (where `ossie pull` and a repo id given as MODEL put them), with the layouts
each holds. huggingface_hub reads and edits the cache; ossie adds only what a gpt-oss checkpoint is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .model.checkpoint import ModelNotFoundError, repo_id


@dataclass
class LocalModel:
    repo: str
    path: Path  # the snapshot folder, what MODEL may be given as
    layouts: list[str]  # "hf" and/or "original"
    size: int  # bytes on disk
    revision: str


def _layouts(path: Path) -> list[str]:
    found = []
    if (path / "config.json").is_file() and any(path.glob("model*.safetensors")):
        found.append("hf")
    if (path / "original" / "config.json").is_file():
        found.append("original")
    return found


def local_models() -> list[LocalModel]:
    """Every snapshot in the Hugging Face cache that holds a gpt-oss checkpoint in either layout."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            layouts = _layouts(rev.snapshot_path)
            if layouts:
                found.append(LocalModel(repo.repo_id, rev.snapshot_path, layouts, rev.size_on_disk, rev.commit_hash))
    return found


def remove(name: str) -> int:
    """Delete a model's snapshots from the cache; the bytes freed. ModelNotFoundError if there is none."""
    from huggingface_hub import scan_cache_dir

    repo = repo_id(name)
    revisions = [m.revision for m in local_models() if m.repo == repo]
    if not revisions:
        raise ModelNotFoundError(f"{name}: not on this machine (ossie list shows what is)")
    strategy = scan_cache_dir().delete_revisions(*revisions)
    strategy.execute()
    return strategy.expected_freed_size
