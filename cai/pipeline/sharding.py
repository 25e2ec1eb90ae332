"""`cai run CONFIG --shard I/N`: the data stages split over N processes (one per GPU or node).

Work is split by *unit*: a batch exactly as the unsharded run forms it (the same prompts in
the same batch, the same per-request seeds). Unit u belongs to shard u % N. Because a unit is
computed identically wherever it runs, merging the shards gives the records of an unsharded
run, not merely records "like" them (tests/test_sharding.py compares them on the embedded
model). I is 0-based, like a rank: `--shard $SLURM_PROCID/$SLURM_NTASKS`.

Layout: shard I of stage S is an ordinary artifact in `RUN/shards/S/I-of-N/` (resumable like
any other); when all N are complete, one process merges them, under an exclusive lock on
`RUN/.lock`, into `RUN/S/`, whose manifest lists every shard as an input with its sha256.
Processes that finish a stage early wait for the merge (a barrier over the file system, so
the run directory must be shared by all shards); the stages after it read the merged
artifact only.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cai.errors import ArtifactError, BadInputError

SHARDS_DIR = "shards"
LOCK_FILE = ".lock"  # short critical sections: merges, run.json updates
OWNER_LOCK = ".owner.lock"  # held for a process's lifetime: who is using the run directory
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_DIR = re.compile(r"^(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise BadInputError(f"--shard {self.index}/{self.count}: the shard index must be in 0..{max(self.count - 1, 0)} "
                                "(0-based, like a rank) and N >= 1")

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        m = _SPEC.match(spec)
        if m is None:
            raise BadInputError(f"--shard {spec!r}: expected I/N, e.g. 0/4 (shard I of N, I 0-based)")
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, unit: int) -> bool:
        return unit % self.count == self.index

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def to_json(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


UNSHARDED = Shard(0, 1)


def shard_dir(run_dir: Path, stage: str, shard: Shard) -> Path:
    return Path(run_dir) / SHARDS_DIR / stage / shard.name


def existing_shards(run_dir: Path, stage: str) -> dict[int, list[Path]]:
    """Shard directories of `stage` already on disk, grouped by their N."""
    found: dict[int, list[Path]] = {}
    root = Path(run_dir) / SHARDS_DIR / stage
    if root.is_dir():
        for d in sorted(root.iterdir()):
            m = _DIR.match(d.name)
            if m and d.is_dir():
                found.setdefault(int(m.group(2)), []).append(d)
    return found


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive across processes (flock on RUN/.lock): merges and run.json updates take it.
    Not re-entrant: take it once per critical section."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def split_counts(run_dir: Path) -> set[int]:
    """Every N the run directory's data stages have been split into (shard dirs and claims)."""
    root = Path(run_dir) / SHARDS_DIR
    names = [p.name for p in root.glob("*/*") if p.is_dir()] + [p.stem for p in root.glob("*.lock")]
    return {int(m.group(2)) for name in names if (m := _DIR.match(name))}


@contextmanager
def claim(run_dir: Path, shard: Shard | None) -> Iterator[None]:
    """Hold the run directory for this process's lifetime: an unsharded `cai run` alone; a
    shard beside its siblings, and never twice. flock claims go with the process, so a
    killed process leaves none behind. Conflicts are bad input, found before any work."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fds: list[int] = []

    def take(path: Path, mode: int, why: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fds.append(fd)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(f"{run_dir}: {why}") from None

    try:
        if shard is None:
            take(run_dir / OWNER_LOCK, fcntl.LOCK_EX,
                 "another cai process (a shard, or a second `cai run`) is using this run directory; wait for it")
        else:
            take(run_dir / OWNER_LOCK, fcntl.LOCK_SH, "an unsharded `cai run` is using this run directory; wait for it")
            with run_lock(run_dir):
                others = sorted(split_counts(run_dir) - {shard.count})
                if others:
                    raise BadInputError(f"{run_dir}: its data stages are split into N={others}; --shard "
                                        f"{shard.index}/{shard.count} would split them another way")
                (run_dir / SHARDS_DIR).mkdir(exist_ok=True)
                take(run_dir / SHARDS_DIR / f"{shard.name}.lock", fcntl.LOCK_EX,
                     f"shard {shard.index}/{shard.count} is already running in another process")
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the flock


def wait_until(ready: Callable[[], str | None], *, what: str, log: Callable[[str], None], poll_seconds: float = 2.0,
               log_every: float = 60.0) -> None:
    """Poll `ready()` (None when ready, else what is still missing) and log the wait now and
    then. No timeout: a dead shard is restarted with the same command and the wait goes on."""
    last_log = 0.0
    while (missing := ready()) is not None:
        if time.monotonic() - last_log >= log_every:
            log(f"waiting for {what}: {missing}")
            last_log = time.monotonic()
        time.sleep(poll_seconds)


def complete_shards(run_dir: Path, stage: str, count: int) -> tuple[list[Path], list[str]]:
    """(shard dirs of `stage` for N = count, names of those not complete yet). Shards of
    another N for the same stage are an error: a stage is split one way."""
    from cai.pipeline.store import MANIFEST, read_manifest

    others = sorted(n for n in existing_shards(run_dir, stage) if n != count)
    if others:
        raise ArtifactError(f"{Path(run_dir) / SHARDS_DIR / stage}: shards of N={others} next to N={count}; "
                            "a stage is split one way (remove the other shards or use their N)")
    dirs = [shard_dir(run_dir, stage, Shard(i, count)) for i in range(count)]
    missing = [d.name for d in dirs if not (d / MANIFEST).is_file() or not read_manifest(d).get("complete")]
    return dirs, missing
