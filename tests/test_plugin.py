"""The pytest plugin, exercised through pytester on small real run directories."""

import importlib.metadata
import json
import xml.etree.ElementTree as ET

import pytest

from cai.harness.session import VOID_EXIT_CODE

pytest_plugins = ["pytester"]


def _entry_point_installed() -> bool:
    return any(ep.value == "cai.harness.plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


# Installed (pip install -e): pytest loads the plugin through the pytest11 entry point;
# otherwise load it explicitly (never both: pluggy refuses a module registered twice).
PLUGIN = [] if _entry_point_installed() else ["-p", "cai.harness.plugin"]

USER_TESTS = """
    import pytest

    def test_run_has_config(cai_run, cai_config):
        assert cai_config.format == "instruction_response"
        assert set(cai_run.stages) == {"candidates", "instructions", "responses"}
        assert cai_run.artifact("responses").joinpath("manifest.json").is_file()

    @pytest.mark.stage("dpo")
    def test_needs_dpo(cai_run):
        raise AssertionError("must be skipped: the run has no dpo artifact")
"""


def run(pytester, *args):
    return pytester.runpytest(*PLUGIN, "-p", "no:cacheprovider", *args)


def report_of(run_dir):
    return json.loads((run_dir / "reports" / "invariants.json").read_text())


def test_passing_run(pytester, make_run_dir):
    run_dir = make_run_dir()
    pytester.makepyfile(test_user=USER_TESTS)
    xml = pytester.path / "junit.xml"
    result = run(pytester, "--cai-run", str(run_dir), f"--junitxml={xml}", "-rs")
    assert result.ret == 0
    outcomes = result.parseoutcomes()
    assert outcomes["skipped"] == 1 and outcomes["passed"] > 10
    result.stdout.fnmatch_lines(["*cai invariants*", "PASS*responses::hashes_verify*", "cai: all * invariant(s) hold*",
                                 "*run has no 'dpo' artifact*"])
    report = report_of(run_dir)
    assert report["verdict"] == "VALID" and report["void"] is False and report["failed"] == []
    assert report["counts"]["fail"] == 0 and report["exitstatus"] == 0
    # JUnit lists every invariant of every artifact as a test case
    cases = {(c.get("classname"), c.get("name")) for c in ET.parse(xml).iter("testcase")}
    assert (f"cai-run[{run_dir.name}].responses", "hashes_verify") in cases
    assert (f"cai-run[{run_dir.name}].responses", "no_chat_markers") in cases
    assert (f"cai-run[{run_dir.name}].instructions", "manifest_complete") in cases
    assert (f"cai-run[{run_dir.name}].run", "loads_sequenced") in cases
    # the stage's own recorded results appear one by one beside the live re-checks
    assert (f"cai-run[{run_dir.name}].responses", "no_chat_markers[recorded]") in cases


def test_tampered_run_is_void(pytester, make_run_dir):
    run_dir = make_run_dir()
    shard = next((run_dir / "responses" / "data").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("Joyful", "Joyful<|im_end|>"))
    pytester.makepyfile(test_user=USER_TESTS)
    xml = pytester.path / "junit.xml"
    result = run(pytester, "--cai-run", str(run_dir), f"--junitxml={xml}")
    assert result.ret == 1 | VOID_EXIT_CODE  # invariant items failed, and the run is void
    result.stdout.fnmatch_lines(["*invariant hashes_verify ?error? failed on responses*",
                                 "FAIL*responses::hashes_verify*", "cai: run VOID: *responses::hashes_verify*"])
    report = report_of(run_dir)
    assert report["verdict"] == "VOID" and report["void"] is True
    assert {"responses::hashes_verify", "responses::no_chat_markers"} <= set(report["failed"])
    failures = {c.get("name") for c in ET.parse(xml).iter("testcase") if c.find("failure") is not None}
    assert {"hashes_verify", "no_chat_markers"} <= failures


def test_void_run_fails_even_when_every_selected_test_passes(pytester, make_run_dir):
    run_dir = make_run_dir()
    shard = next((run_dir / "responses" / "data").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("Joyful", "Cheerful"))
    pytester.makepyfile(test_user=USER_TESTS)
    result = run(pytester, "--cai-run", str(run_dir), "-m", "not invariant")
    assert result.parseoutcomes().get("failed", 0) == 0
    assert result.ret == VOID_EXIT_CODE
    assert report_of(run_dir)["failed"] == ["responses::hashes_verify"]


def test_no_gate_reports_without_changing_the_exit_status(pytester, make_run_dir):
    run_dir = make_run_dir()
    shard = next((run_dir / "responses" / "data").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("Joyful", "Cheerful"))
    pytester.makepyfile(test_user=USER_TESTS)
    result = run(pytester, "--cai-run", str(run_dir), "-m", "not invariant", "--cai-no-gate")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["cai: run VOID: *gate disabled*"])
    assert report_of(run_dir)["verdict"] == "VOID"


def test_gate_records_failures_from_tests(pytester, tmp_path):
    pytester.makepyfile(test_gate="""
        from cai.invariants.data import RecordSet
        from cai.invariants.leakage import NoChatMarkers

        def test_records_a_failure(cai_gate):
            recs = [{"id": "r1", "instruction": "x", "format": "raw", "prompt": "x", "completion": " <|im_start|>"}]
            results = cai_gate.check([NoChatMarkers()], RecordSet("sft", recs), subject="demo.jsonl")
            assert results[0].status.value == "fail"   # the test passes; the gate voids the session

        def test_clean(cai_gate):
            cai_gate.check([NoChatMarkers()], RecordSet("sft", [{"id": "a", "completion": " fine"}]), subject="ok")
    """)
    xml = pytester.path / "junit.xml"
    result = run(pytester, "--cai-report-dir", str(tmp_path / "rep"), f"--junitxml={xml}")
    assert result.parseoutcomes()["passed"] == 2
    assert result.ret == VOID_EXIT_CODE
    report = json.loads((tmp_path / "rep" / "invariants.json").read_text())
    assert report["verdict"] == "VOID" and report["failed"] == ["demo.jsonl::no_chat_markers"]
    assert report["results"][0]["source"].endswith("test_records_a_failure")
    props = [p.get("name") for p in ET.parse(xml).iter("property")]
    assert "cai_invariant:demo.jsonl::no_chat_markers" in props


def test_without_a_run_fixtures_skip_with_a_reason(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = run(pytester, "-rs")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*no run under test: pass --cai-run DIR*"])


def test_markers_are_declared(pytester):
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.invariant:*", "@pytest.mark.stage(name):*", "@pytest.mark.gpu:*",
                                 "@pytest.mark.slow:*"])


def test_options_live_in_one_group(pytester):
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(["cai: invariants decide whether a run counts:", "*--cai-run=DIR*",
                                 "*--cai-report-dir=DIR*", "*--cai-no-gate*"])


def test_invariant_items_are_selectable(pytester, make_run_dir):
    run_dir = make_run_dir()
    pytester.makepyfile(test_user=USER_TESTS)
    result = run(pytester, "--cai-run", str(run_dir), "-m", "invariant", "--collect-only", "-q")
    result.stdout.fnmatch_lines([f"cai-run[[]{run_dir.name}[]]::responses::hashes_verify"])
    assert "test_run_has_config" not in result.stdout.str()


def test_missing_run_dir_is_a_usage_error(pytester, tmp_path):
    result = run(pytester, "--cai-run", str(tmp_path / "nope"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--cai-run*run directory not found*"])


def test_failure_recorded_in_a_manifest_voids_the_run(pytester, make_run_dir, sft_record):
    bad = [sft_record(0, "Name a fruit.", " [INST] apple [/INST]"), sft_record(1, "Name a planet.", " Mars.")]
    run_dir = make_run_dir(sft_records=bad)  # the stage recorded the failure; data files are intact
    result = run(pytester, "--cai-run", str(run_dir), "-m", "invariant")
    assert result.ret == 1 | VOID_EXIT_CODE
    failed = report_of(run_dir)["failed"]
    assert "responses::no_chat_markers[recorded]" in failed and "responses::no_chat_markers" in failed
    assert "responses::hashes_verify" not in failed
