"""``hf:ORG/NAME``: the snapshot of a repository in the local Hugging Face cache, found without
``huggingface_hub`` reading anything.

The cache is a folder anyone with write access may have changed: ``refs/main`` may be a FIFO (a read
blocks for ever), a link to ``/dev/zero`` (a read never ends) or name ``../../../x`` (a snapshot
outside the cache). The ref is read here as an untrusted file: a regular file, a bounded read, a
commit hash, and a snapshot folder that lies inside the repository's own cache folder. The files of a
snapshot are links into the repository's ``blobs/``, which is how the cache is laid out; a link that
leaves the repository's folder is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from attnexplain.plugin_api import ModelLoadError, not_a_regular_file

#: A ref holds a commit hash and a newline; anything longer is not a ref.
MAX_REF_BYTES = 256
#: A git commit hash (SHA-1), or a SHA-256 one.
_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
#: A snapshot holds a model's files (a few dozen shards at most); more is not a snapshot.
MAX_SNAPSHOT_ENTRIES = 10_000


def repository_folder(cache: Path, repo_id: str) -> Path:
    """Where the cache keeps ``repo_id`` (``models--ORG--NAME``), as huggingface_hub names it."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str) -> Path:
    """The snapshot ``refs/main`` names in the local cache; nothing is downloaded or read beyond the
    ref. ``repo_id`` is already a plain ``ORG/NAME`` (no ``..``)."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    repository = repository_folder(cache, repo_id)
    ref = repository / "refs" / "main"
    if not repository.is_dir() or not (ref.exists() or ref.is_symlink()):
        raise ModelLoadError(
            f"hf:{repo_id} is not in the local Hugging Face cache ({cache}); "
            f"attnexplain never downloads. Fetch it first (hf download {repo_id}) "
            f"or save it with save_pretrained and pass the folder."
        )
    damaged = f"hf:{repo_id}: the local Hugging Face cache ({cache}) is damaged or tampered with:"
    problem = not_a_regular_file(ref)
    if problem is not None:  # checked before opening: a FIFO would block, a device never end
        raise ModelLoadError(f"{damaged} {ref} {problem}.")
    try:
        with ref.open("rb") as handle:
            content = handle.read(MAX_REF_BYTES + 1)
    except OSError as error:
        raise ModelLoadError(f"{damaged} {ref} cannot be read ({error.strerror or error}).") from None
    commit = content.decode("ascii", "replace").strip()
    if len(content) > MAX_REF_BYTES or not _COMMIT.match(commit):
        raise ModelLoadError(f"{damaged} {ref} does not hold a commit hash.")
    snapshot = repository / "snapshots" / commit
    if not snapshot.is_dir():
        raise ModelLoadError(
            f"hf:{repo_id}: {ref} names commit {commit}, whose snapshot is not in "
            f"the local cache ({snapshot}); attnexplain never downloads. Fetch it "
            f"first (hf download {repo_id})."
        )
    _check_inside(snapshot, repository, damaged)
    return snapshot


def _check_inside(snapshot: Path, repository: Path, damaged: str) -> None:
    """The snapshot folder, and every file in it once its links are followed, lie in the
    repository's cache folder (its blobs): a link elsewhere makes the cache load another model."""
    root = repository.resolve()
    if not snapshot.resolve().is_relative_to(root):
        raise ModelLoadError(f"{damaged} the snapshot {snapshot} lies outside {root}.")
    for count, entry in enumerate(snapshot.iterdir()):
        if count >= MAX_SNAPSHOT_ENTRIES:
            raise ModelLoadError(f"{damaged} the snapshot {snapshot} holds over {MAX_SNAPSHOT_ENTRIES:,} entries.")
        try:
            target = entry.resolve(strict=False)
        except (OSError, RuntimeError):  # a link loop
            target = None
        if target is None or not target.is_relative_to(root):
            raise ModelLoadError(f"{damaged} {entry} links outside {root}.")
