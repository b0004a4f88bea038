"""What a run checks of its out dir before it writes anything: no links, not another job's, no lost journal.

- Nothing the engine writes or deletes may be a symlink: a planted ``results.jsonl`` or ``images`` link
  would make the engine write or delete files outside the out dir. Such an out dir is refused, naming them.
- An out dir holds one manifest's run. Two manifests with the same ``name:`` both default to
  ``out/<name>``; the second would retire the first's items. It is refused unless the user says
  ``--take-over`` (the first's items are then retired to the archive, never forgotten).
- A journal that is missing or empty beside outputs of an earlier run is rebuilt from the out dir's own
  record before anything is sent (`rebuild`), or the run is refused.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread

from batch_engine.errors import UsageError
from batch_engine.store import rebuild
from batch_engine.store.files import IMAGES_DIR, INPUTS_DIR, JOURNAL_NAME, RESULTS_NAME
from batch_engine.store.journal import Journal
from batch_engine.store.lock import LOCK_NAME
from batch_engine.values import RunMeta

log = logging.getLogger(__name__)

THUMBS_DIR = "thumbs"
#: Every name in the out dir the engine writes, replaces or deletes.
WRITTEN_NAMES = (
    LOCK_NAME,
    JOURNAL_NAME,
    f"{JOURNAL_NAME}-wal",
    f"{JOURNAL_NAME}-shm",
    f"{JOURNAL_NAME}-journal",
    IMAGES_DIR,
    INPUTS_DIR,
    THUMBS_DIR,
    RESULTS_NAME,
    "report.yaml",
    "failures.yaml",
    "index.html",
)


class OutDirTaken(UsageError):
    """The out dir holds the run of another manifest (and --take-over was not given)."""


def refuse_links(out_dir: Path) -> None:
    """UsageError naming every symlink among the names the engine writes; nothing is written through one."""
    links = [name for name in WRITTEN_NAMES if (out_dir / name).is_symlink()]
    if links:
        shown = ", ".join(str(out_dir / name) for name in links)
        verb = "is a symlink" if len(links) == 1 else "are symlinks"
        raise UsageError(
            f"refusing to use {out_dir}: {shown} {verb}, and "
            "batch-engine never writes or deletes through a link (it could reach files outside the out dir); "
            "remove the link, or point --out at the real folder"
        )


def check_owner(previous: RunMeta | None, manifest_path: str, *, take_over: bool) -> None:
    """OutDirTaken when the out dir's last run came from another manifest file."""
    if previous is None or not previous.manifest_path or take_over:
        return
    earlier = Path(previous.manifest_path)
    if (earlier if earlier.is_absolute() else earlier.resolve()) == Path(manifest_path):
        return
    raise OutDirTaken(
        f"this out dir holds the run of another manifest, {previous.manifest_path} (name "
        f"{previous.name!r}); this one is {manifest_path}. Give this manifest an out dir of its own "
        "(--out), or add --take-over to let it take this one over: the other manifest's items are then "
        "retired to the journal's archive (never forgotten, back if that manifest runs here again)"
    )


async def recover_lost_journal(journal: Journal, out_dir: Path, *, found: rebuild.Found | None = None) -> int:
    """Before the first sync of an empty journal: take back what the out dir's files say of an earlier
    run (see `rebuild`; ``found``: where its outputs are looked for, when not in the out dir); returns how
    many items were recovered. JournalError when outputs are there but nothing says which request they
    answer."""
    if not journal.is_empty():
        return 0
    evidence = rebuild.evidence(out_dir)
    if not evidence.any:
        return 0
    records = await anyio.to_thread.run_sync(partial(rebuild.recovered_records, out_dir, found=found))
    adopted = await journal.adopt(records)
    log.warning(
        "the journal of %s was missing or empty beside %s: %d item(s) recovered from them before anything "
        "is sent (their prediction ids and outputs kept)",
        out_dir,
        evidence.describe(out_dir),
        adopted,
    )
    return adopted
