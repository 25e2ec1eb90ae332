"""Crash-safe artifacts: JSONL shards + manifest.json.

Records are appended to `data/part-NNNNN.jsonl.partial` with flush + fsync; a full shard
is renamed atomically to `part-NNNNN.jsonl` and the manifest (written atomically) lists
it with its sha256. A crash loses at most the record being written: on resume the torn
last line of the partial shard is cut off and every earlier record survives. A
manifest with `complete: false` describes an interrupted artifact; readers refuse it,
and refuse any artifact whose data no longer matches its hashes or whose error-severity
invariants failed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.errors import ArtifactError, BadInputError, CaiError

MANIFEST = "manifest.json"
SCHEMA = "cai.artifact/1"
DATA_DIR = "data"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill mid-write leaves the old file and no stray .tmp
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of objects; a bad line is an error naming the file and line."""
    return [obj for _, obj in numbered_jsonl(path)]


def numbered_jsonl(path: str | Path, error: type[CaiError] = ArtifactError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line. A missing file is bad input; a bad
    line raises `error` naming the file and line (an artifact's by default; user input
    files pass BadInputError)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{path}:{lineno}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{lineno}: invalid JSON ({err.msg}); the line may be truncated") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def read_json_object(path: str | Path, error: type[CaiError] = ArtifactError) -> dict[str, Any]:
    """A JSON file that must hold one object (a manifest, run.json): unreadable bytes, invalid
    JSON or another type raise `error` naming the file, in one line."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 (byte offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: invalid JSON ({err.msg}); the file may be truncated") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    from cai import __version__
    from cai.pipeline.models import library_versions

    return {"cai": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "libraries": library_versions(), "git_commit": git_commit()}


def input_entry(artifact_dir: str | Path, consumer_dir: str | Path) -> dict[str, Any]:
    """How the manifest of the artifact in `consumer_dir` names an input artifact: its path
    relative to the consumer (so a moved or copied run checks its own files), its stage and
    the sha256 of its manifest (which holds the hashes of its data): any later change shows."""
    artifact = read_artifact(artifact_dir)
    rel = os.path.relpath(Path(artifact_dir).resolve(), Path(consumer_dir).resolve())
    return {"path": Path(rel).as_posix(), "stage": artifact.manifest["stage"],
            "manifest_sha256": sha256_file(Path(artifact_dir) / MANIFEST)}


def input_dir(consumer_dir: str | Path, entry: dict[str, Any]) -> Path:
    """The directory an input entry names, resolved against the artifact that lists it."""
    return Path(os.path.normpath(Path(consumer_dir) / str(entry.get("path", ""))))


class ArtifactWriter:
    """Append records to a stage's artifact directory; `finalize` certifies it.

    With `resume=True` an interrupted artifact is reopened: `done` holds the records that
    survived, and appends continue after them.
    """

    def __init__(self, directory: str | Path, stage: str, *, config_hash: str, seed: int | None = None,
                 inputs: Iterable[dict[str, Any]] = (), shard_size: int = 1000, resume: bool = False):
        self.dir = Path(directory)
        self.data_dir = self.dir / DATA_DIR
        self.shard_size = shard_size
        self.started = time.time()
        manifest_path = self.dir / MANIFEST
        if manifest_path.exists() and not resume:
            raise ArtifactError(f"{self.dir}: artifact already exists (use --resume, or a new --out directory)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = {
            "schema": SCHEMA, "stage": stage, "complete": False, "certified": False,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "config_hash": config_hash, "seed": seed, "inputs": list(inputs),
            "outputs": {"files": {}, "records": 0},
        }
        self.done: list[dict] = []
        if manifest_path.exists():
            self._reopen(read_json_object(manifest_path), config_hash)
        self._shard_index = len(self.manifest["outputs"]["files"])
        self._partial_count = 0
        self._fh = None
        self._recover_partial()
        write_json_atomic(manifest_path, self.manifest)

    # -- resume -----------------------------------------------------------------

    def _reopen(self, old: dict[str, Any], config_hash: str) -> None:
        if old.get("config_hash") != config_hash:
            raise ArtifactError(f"{self.dir}: was written under another config (hash {old.get('config_hash', '?')[:12]}); "
                                "resume needs the same config")
        if old.get("complete"):
            raise ArtifactError(f"{self.dir}: artifact is already complete")
        def identity(inputs):  # not the paths: a moved run directory still resumes
            return [(i.get("stage"), i.get("manifest_sha256")) for i in inputs or []]

        if identity(old.get("inputs")) != identity(self.manifest["inputs"]):
            raise ArtifactError(f"{self.dir}: was started from other input artifacts than now "
                                "(an input changed since); remove it to start over from the current inputs")
        self.manifest = old
        for name, meta in old["outputs"]["files"].items():
            path = self.dir / name
            if not path.is_file() or sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"{path}: finished shard missing or altered since it was written")
            self.done.extend(read_jsonl(path))

    def _partial_path(self) -> Path:
        return self.data_dir / f"part-{self._shard_index:05d}.jsonl.partial"

    def _recover_partial(self) -> None:
        """Keep every complete line of an interrupted shard; cut a torn last line."""
        path = self._partial_path()
        if not path.exists():
            return
        good_bytes = 0
        kept = []
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    kept.append(json.loads(raw.decode("utf-8")))
                except ValueError:  # invalid JSON or not UTF-8: torn from here on
                    break
                good_bytes += len(raw)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
            f.flush()
            os.fsync(f.fileno())
        self.done.extend(kept)
        self._partial_count = len(kept)

    # -- writing ----------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str)
        if "\n" in line:
            raise ValueError("record serialises with a newline")  # json.dumps never does; guard the format
        if self._fh is None:
            self._fh = open(self._partial_path(), "a", encoding="utf-8")
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._partial_count += 1
        self.done.append(record)
        if self._partial_count >= self.shard_size:
            self._seal_shard()

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.append(r)

    def _seal_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        partial = self._partial_path()
        if not partial.exists() or self._partial_count == 0:
            partial.unlink(missing_ok=True)
            return
        final = partial.with_name(partial.name[: -len(".partial")])
        os.replace(partial, final)
        _fsync_dir(self.data_dir)
        rel = f"{DATA_DIR}/{final.name}"
        self.manifest["outputs"]["files"][rel] = {"sha256": sha256_file(final), "records": self._partial_count,
                                                  "bytes": final.stat().st_size}
        self.manifest["outputs"]["records"] = sum(m["records"] for m in self.manifest["outputs"]["files"].values())
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        self._shard_index += 1
        self._partial_count = 0

    def finalize(self, *, invariants: Iterable[Any] = (), model: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
                 files: Iterable[Path] = ()) -> dict[str, Any]:
        """Seal the last shard and write the complete manifest. `files` are further outputs
        inside the artifact directory (adapter weights, plots) whose hashes it records.
        `certified` is true only when invariants ran and no error-severity one failed."""
        results = [r.to_json() if hasattr(r, "to_json") else dict(r) for r in invariants]
        self._seal_shard()
        for path in sorted(Path(f) for f in files):
            rel = path.resolve().relative_to(self.dir.resolve()).as_posix()
            self.manifest["outputs"]["files"][rel] = {"sha256": sha256_file(path), "records": 0,
                                                      "bytes": path.stat().st_size, "kind": "file"}
        self.manifest.update({
            "complete": True,
            "certified": certifies(results),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "timings": {"wall_seconds": round(time.time() - self.started, 3)},
            "memory": memory or {},
            "model": model,
            "environment": environment(),
            "invariants": results,
            "extra": extra or {},
        })
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        return self.manifest

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


VALID_OUTCOMES = {("pass", "error"), ("pass", "warning"), ("warn", "warning")}


def certifies(results: list[dict[str, Any]]) -> bool:
    """Invariant results certify an artifact when there are some, at least one is an
    error-severity check, and every one passed (or, for a warning-severity one, warned): an
    artifact nothing blocking checked is never certified, and a result whose status or
    severity is not one cai writes (a hand-edited "warn" on an error check) counts as failed."""
    outcomes = [(r.get("status"), r.get("severity")) if isinstance(r, dict) else None for r in results]
    return (bool(outcomes) and all(o in VALID_OUTCOMES for o in outcomes)
            and any(o == ("pass", "error") for o in outcomes))


@dataclass
class Artifact:
    dir: Path
    manifest: dict[str, Any]

    @property
    def certified(self) -> bool:
        return bool(self.manifest.get("certified"))

    def files(self) -> list[Path]:
        return [self.dir / name for name, meta in self.manifest["outputs"]["files"].items() if meta.get("kind") != "file"]

    def records(self) -> Iterator[dict[str, Any]]:
        for path in self.files():
            yield from read_jsonl(path)


def verify_hashes(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the artifact's data files: missing, altered, or unlisted."""
    problems = []
    listed = manifest.get("outputs", {}).get("files", {})
    for name, meta in listed.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (data altered after it was written)")
    data_dir = directory / DATA_DIR
    if data_dir.is_dir():
        for path in sorted(data_dir.glob("*.jsonl")):
            if f"{DATA_DIR}/{path.name}" not in listed:
                problems.append(f"{path}: data file not listed in the manifest")
    return problems


def peek_records(directory: str | Path) -> list[dict]:
    """Records written so far to an artifact another process may still be writing: its
    sealed shards, then the complete lines of its open shard (a torn last line is skipped).
    It may miss records the writer has written (a shard sealed mid-read shows up on the next
    call) and never returns a record it has not. Read-only; for coordinating with a live
    writer, never as a stage input."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return []
    records = []
    for name, meta in read_manifest(directory)["outputs"]["files"].items():
        if meta.get("kind") != "file":
            records.extend(read_jsonl(directory / name))
    for partial in sorted((directory / DATA_DIR).glob("*.jsonl.partial")):
        try:
            data = partial.read_bytes()
        except FileNotFoundError:  # sealed since the manifest was read: seen on the next peek
            continue
        for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is torn or empty
            try:
                records.append(json.loads(raw.decode("utf-8")))
            except ValueError:  # invalid JSON or not UTF-8
                break
    return records


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not an artifact, or never started)")
    manifest = read_json_object(path)
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path}: not a cai artifact manifest (schema {manifest.get('schema')!r})")
    return manifest


def read_artifact(directory: str | Path, *, require_certified: bool = True) -> Artifact:
    """Open an artifact for use as a stage input: it must be complete, its hashes must
    verify, and (by default) its error-severity invariants must have passed."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest.get("complete"):
        raise ArtifactError(f"{directory}: artifact is incomplete (interrupted run; finish it with --resume)")
    problems = verify_hashes(directory, manifest)
    if problems:
        raise ArtifactError(problems[0])
    if require_certified and not manifest.get("certified"):
        recorded = manifest.get("invariants") if isinstance(manifest.get("invariants"), list) else []
        failed = [str(r.get("name")) for r in recorded if isinstance(r, dict) and r.get("status") == "fail"]
        why = f"failed invariants: {', '.join(failed)}" if failed else "no invariant results: nothing checked it"
        raise ArtifactError(f"{directory}: not certified ({why})")
    return Artifact(directory, manifest)
