"""Artifacts survive crashes: a SIGKILLed writer loses at most the record being written,
earlier records stay readable, the manifest stays consistent, and tampering is caught."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.errors import ArtifactError
from cai.invariants.base import Result, Severity, Status
from cai.pipeline.store import (ArtifactWriter, input_dir, input_entry, peek_records, read_artifact, read_jsonl,
                                read_manifest)

CHECKED = [Result("records_written", Status.PASS, Severity.ERROR, "the test wrote these records")]

WRITER = textwrap.dedent("""
    import sys
    from cai.pipeline.store import ArtifactWriter
    w = ArtifactWriter(sys.argv[1], "demo", config_hash="h", shard_size=7, resume=True)
    start = len(w.done)
    for i in range(start, 10**6):
        w.append({"id": i, "text": "x" * 2000})
        if i == start + 20:
            print("ready", flush=True)
""")


def wait_for_ready(proc):
    assert proc.stdout.readline().strip() == "ready"


def test_sigkill_mid_write_keeps_earlier_records_and_resumes(tmp_path):
    out = tmp_path / "artifact"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    wait_for_ready(proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    manifest = read_manifest(out)
    assert manifest["complete"] is False
    for name, meta in manifest["outputs"]["files"].items():  # every sealed shard verifies
        assert len(read_jsonl(out / name)) == meta["records"] == 7
    with pytest.raises(ArtifactError, match="incomplete"):
        read_artifact(out)

    writer = ArtifactWriter(out, "demo", config_hash="h", shard_size=7, resume=True)
    survived = [r["id"] for r in writer.done]
    assert survived == list(range(len(survived))) and len(survived) > 20
    for i in range(len(survived), len(survived) + 5):
        writer.append({"id": i, "text": "x"})
    writer.finalize(invariants=[Result("ok", Status.PASS, Severity.ERROR, "fine")])
    ids = [r["id"] for r in read_artifact(out).records()]
    assert ids == list(range(len(survived) + 5))


def test_torn_last_line_is_cut_on_resume(tmp_path):
    writer = ArtifactWriter(tmp_path, "demo", config_hash="h", shard_size=100)
    writer.extend({"id": i} for i in range(3))
    writer.close()
    partial = next((tmp_path / "data").glob("*.partial"))
    with open(partial, "a") as f:
        f.write('{"id": 3, "te')  # the crash hit mid-record
    resumed = ArtifactWriter(tmp_path, "demo", config_hash="h", shard_size=100, resume=True)
    assert [r["id"] for r in resumed.done] == [0, 1, 2]
    resumed.append({"id": 3})
    resumed.finalize(invariants=CHECKED)
    assert [r["id"] for r in read_artifact(tmp_path).records()] == [0, 1, 2, 3]


def test_bytes_that_are_not_utf8_end_the_recovered_part_of_a_torn_shard(tmp_path):
    writer = ArtifactWriter(tmp_path, "demo", config_hash="h", shard_size=100)
    writer.extend({"id": i} for i in range(2))
    writer.close()
    partial = next((tmp_path / "data").glob("*.partial"))
    with open(partial, "ab") as f:
        f.write(b'{"id": "\xff\xfe"}\n')  # garbage where the crash hit
    resumed = ArtifactWriter(tmp_path, "demo", config_hash="h", shard_size=100, resume=True)
    assert [r["id"] for r in resumed.done] == [0, 1]
    assert peek_records(tmp_path) == [{"id": 0}, {"id": 1}]


def test_tampered_data_is_detected_by_hash(tmp_path):
    writer = ArtifactWriter(tmp_path, "demo", config_hash="h")
    writer.extend({"id": i, "completion": " ok"} for i in range(4))
    writer.finalize(invariants=CHECKED)
    data = next((tmp_path / "data").glob("*.jsonl"))
    data.write_text(data.read_text().replace(" ok", " OK", 1))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        read_artifact(tmp_path)


def test_failed_error_invariant_means_not_certified(tmp_path):
    writer = ArtifactWriter(tmp_path, "demo", config_hash="h")
    writer.append({"id": 0})
    manifest = writer.finalize(invariants=[Result("no-chat-markers", Status.FAIL, Severity.ERROR, "record 0: <|im_start|>")])
    assert manifest["certified"] is False
    with pytest.raises(ArtifactError, match="no-chat-markers"):
        read_artifact(tmp_path)
    assert read_artifact(tmp_path, require_certified=False).manifest["stage"] == "demo"


def test_an_artifact_nothing_checked_is_not_certified(tmp_path):
    writer = ArtifactWriter(tmp_path, "demo", config_hash="h")
    writer.append({"id": 0})
    assert writer.finalize()["certified"] is False
    with pytest.raises(ArtifactError, match="nothing checked it"):
        read_artifact(tmp_path)


@pytest.mark.parametrize("content, message", [(b"[1, 2]\n", "expected a JSON object, got list"),
                                              (b'{"schema": "cai.artifact/1", "sta', "invalid JSON"),
                                              (b'{"schema": "cai.artifact/1", "stage": "\xff"}', "not UTF-8")])
def test_an_unreadable_manifest_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=message) as err:
        read_manifest(tmp_path)
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value)


def test_a_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ArtifactError, match=r"x\.jsonl:2: not UTF-8 \(byte 0xe9 at column 11\)"):
        read_jsonl(path)


def test_inputs_are_named_relative_to_the_consumer_so_a_moved_run_checks_its_own_files(tmp_path):
    upstream = ArtifactWriter(tmp_path / "run" / "instructions", "instructions", config_hash="h")
    upstream.append({"id": "a"})
    upstream.finalize(invariants=CHECKED)
    entry = input_entry(tmp_path / "run" / "instructions", tmp_path / "run" / "responses")
    assert entry["path"] == "../instructions"
    (tmp_path / "run").rename(tmp_path / "moved")
    assert read_artifact(input_dir(tmp_path / "moved" / "responses", entry)).manifest["stage"] == "instructions"


def test_resume_refuses_another_config(tmp_path):
    ArtifactWriter(tmp_path, "demo", config_hash="a").append({"id": 0})
    with pytest.raises(ArtifactError, match="another config"):
        ArtifactWriter(tmp_path, "demo", config_hash="b", resume=True)


def test_resume_refuses_changed_inputs(tmp_path):
    """A shard or stage interrupted, its input artifact regenerated, then resumed: the old
    records came from the old input and must not be mixed with new ones."""
    before = {"path": "/runs/a/instructions", "stage": "instructions", "manifest_sha256": "1" * 64}
    after = dict(before, manifest_sha256="2" * 64)
    ArtifactWriter(tmp_path / "x", "responses", config_hash="a", inputs=[before]).append({"id": 0})
    with pytest.raises(ArtifactError, match="other input artifacts"):
        ArtifactWriter(tmp_path / "x", "responses", config_hash="a", inputs=[after], resume=True)
    moved = dict(before, path="/elsewhere/instructions")  # the same input in a moved run directory
    assert len(ArtifactWriter(tmp_path / "x", "responses", config_hash="a", inputs=[moved], resume=True).done) == 1


def test_existing_artifact_is_never_overwritten(tmp_path):
    ArtifactWriter(tmp_path, "demo", config_hash="a").finalize(invariants=CHECKED)
    with pytest.raises(ArtifactError, match="already exists"):
        ArtifactWriter(tmp_path, "demo", config_hash="a")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ArtifactError, match=r"x\.jsonl:2: invalid JSON"):
        read_jsonl(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=12), st.integers(1, 5))
def test_records_round_trip_through_shards(tmp_path_factory, records, shard_size):
    out = tmp_path_factory.mktemp("a")
    writer = ArtifactWriter(out, "demo", config_hash="h", shard_size=shard_size)
    writer.extend(records)
    manifest = writer.finalize(invariants=CHECKED)
    assert list(read_artifact(out).records()) == records
    assert manifest["outputs"]["records"] == len(records)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))


@given(st.integers(0, 12), st.integers(1, 5), st.binary(max_size=20).filter(lambda b: b"\n" not in b))
def test_peek_sees_what_a_live_writer_wrote_never_more(tmp_path_factory, n, shard_size, torn):
    """Another process's view of an artifact being written (sharded candidate generation
    reads its siblings this way): sealed shards plus the open shard's complete lines; a torn
    last line is not a record."""
    directory = tmp_path_factory.mktemp("peek") / "a"
    writer = ArtifactWriter(directory, "candidates", config_hash="h", shard_size=shard_size)
    records = [{"id": f"r{i}", "text": "x" * i} for i in range(n)]
    writer.extend(records)
    assert peek_records(directory) == records
    open_shard = sorted((directory / "data").glob("*.partial"))
    if open_shard:
        with open(open_shard[0], "ab") as f:
            f.write(torn)  # a write cut by a crash or still in flight
        assert peek_records(directory) == records
    writer.close()
    assert peek_records(directory / "missing") == []


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    from cai.pipeline import store

    path = tmp_path / "manifest.json"
    store.write_json_atomic(path, {"v": 1})

    def full_disk(obj, f, **kw):
        f.write('{"v": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.json, "dump", full_disk)
    with pytest.raises(OSError):
        store.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
