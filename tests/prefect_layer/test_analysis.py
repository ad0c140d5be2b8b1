"""Analyses: loading a callable by name, the example analysis, and the analyze-file flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.examples import analysis as example
from msi_prefect.examples.analysis import summarize
from msi_prefect.prefect_layer.analysis import (
    DEFAULT_ANALYSIS,
    AnalysisError,
    AnalysisSpecError,
    _checked_json,
    analysis_markdown,
    load_callable,
)
from msi_prefect.prefect_layer.events import EventName
from tests.flow_helpers import file_params, flow_run_name, load_flow, read_artifacts, read_events


def peak_records(path: Path, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """A test analysis returning records (shown as a table artifact)."""
    return [{"peak": index, "position": index * 10, "size": metadata["size"]} for index in range(3)]


# --------------------------------------------------------------------------- load_callable


def test_load_callable_finds_functions_and_methods() -> None:
    assert load_callable(DEFAULT_ANALYSIS) is summarize
    assert load_callable(" msi_prefect.examples.analysis:summarize ") is summarize
    assert load_callable("pathlib:Path.home") == Path.home


@pytest.mark.parametrize(
    "spec", ["", "summarize", "a:b:c", "pkg.:f", ":f", "pkg:", "pkg/mod:f", "pkg:f()", "1pkg:f"]
)
def test_load_callable_refuses_malformed_specs(spec: str) -> None:
    with pytest.raises(AnalysisSpecError, match=r"is not of the form 'package\.module:function'"):
        load_callable(spec)


def test_load_callable_refuses_a_non_string() -> None:
    with pytest.raises(AnalysisSpecError, match="is not of the form"):
        load_callable(42)  # type: ignore[arg-type]


def test_load_callable_names_a_module_that_is_not_installed() -> None:
    with pytest.raises(AnalysisSpecError, match=r"'no_such_lab_pkg\.mod' .* cannot be found; is"):
        load_callable("no_such_lab_pkg.mod:run")


def test_load_callable_reports_a_module_whose_import_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_lab_analysis.py").write_text("raise RuntimeError('bad config')\n")
    (tmp_path / "needy_lab_analysis.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(AnalysisSpecError, match="failed: RuntimeError\\('bad config'\\)"):
        load_callable("broken_lab_analysis:run")
    with pytest.raises(AnalysisSpecError, match="needs 'no_such_dependency_xyz'"):
        load_callable("needy_lab_analysis:run")


def test_load_callable_names_the_missing_attribute() -> None:
    with pytest.raises(
        AnalysisSpecError, match=r"module 'msi_prefect\.examples\.analysis' has no attribute 'nope'"
    ):
        load_callable("msi_prefect.examples.analysis:nope")
    with pytest.raises(AnalysisSpecError, match="'pathlib:Path' has no attribute 'nope'"):
        load_callable("pathlib:Path.nope")


def test_load_callable_refuses_what_is_not_callable() -> None:
    with pytest.raises(AnalysisSpecError, match="is a int, not a function"):
        load_callable("msi_prefect.examples.analysis:MAX_SCAN_BYTES")


def test_results_must_be_json() -> None:
    assert _checked_json("m:f", {"a": [1, 2.5, None, "x"]}) == '{"a": [1, 2.5, null, "x"]}'
    with pytest.raises(AnalysisError, match="returned a set that is not JSON-compatible"):
        _checked_json("m:f", {1, 2})
    with pytest.raises(AnalysisError, match="not JSON-compatible"):
        _checked_json("m:f", {"x": float("nan")})


def test_analysis_markdown_escapes_table_cells() -> None:
    text = analysis_markdown("a|b.txt", "m:f", {"k|1": "v\nw", "n": [1, 2]})
    assert "| k\\|1 | v w |" in text
    assert "| n | [1, 2] |" in text
    assert '"k|1": "v\\nw"' in text  # the JSON block keeps the exact values


# --------------------------------------------------------------------------- example analysis


def test_summarize_constant_and_uniform_files(tmp_path: Path) -> None:
    constant = tmp_path / "zeros.bin"
    constant.write_bytes(bytes(1000))
    uniform = tmp_path / "all.bin"
    uniform.write_bytes(bytes(range(256)) * 4)

    zeros = summarize(constant, {"mime_type": "application/octet-stream"})
    every = summarize(uniform, {})

    assert zeros["bytes_scanned"] == 1000 and zeros["complete"] is True
    assert zeros["entropy_bits_per_byte"] == 0.0
    assert zeros["zero_fraction"] == 1.0
    assert zeros["top_bytes"] == [{"byte": "0x00", "count": 1000}]
    assert zeros["mime_type"] == "application/octet-stream"
    assert every["entropy_bits_per_byte"] == 8.0
    assert every["distinct_bytes"] == 256
    assert every["mean_byte"] == 127.5
    assert every["top_bytes"][0] == {"byte": "0x00", "count": 4}
    json.dumps(every)


def test_summarize_text_and_empty_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")

    assert summarize(text, {})["text_fraction"] == 1.0
    nothing = summarize(empty, {})
    assert nothing["bytes_scanned"] == 0 and nothing["complete"] is True
    assert nothing["entropy_bits_per_byte"] == 0.0 and nothing["top_bytes"] == []


def test_summarize_reads_at_most_the_scan_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(example, "MAX_SCAN_BYTES", 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 5000)

    result = summarize(big, {})

    assert result["bytes_scanned"] == 1000
    assert result["complete"] is False


# --------------------------------------------------------------------------- flow (stack)


@pytest.mark.stack
def test_analyze_flow_runs_the_default_analysis(
    prefect_api: str, topic: str, tmp_path: Path
) -> None:
    params = file_params(tmp_path / "dest", "run/a.dat", bytes(range(256)) * 16, topic)
    analyze_file_flow = load_flow("flows/analyze_file.py:analyze_file_flow")

    state = analyze_file_flow(**params, return_state=True)

    assert state.is_completed(), state.message
    assert state.result().result["entropy_bits_per_byte"] == 8.0
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_name(flow_run_id) == "analyze run/a.dat"
    artifacts = read_artifacts(f"analysis-{params['file_id'][:12]}", flow_run_id)
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    assert "| entropy_bits_per_byte | 8.0 |" in artifacts[0].data
    events = read_events(EventName.ANALYZED, f"msi.file.{topic}.{params['file_id']}")
    assert len(events) == 1
    assert events[0].payload["analysis"] == DEFAULT_ANALYSIS
    assert events[0].payload["result"]["distinct_bytes"] == 256


@pytest.mark.stack
def test_analyze_flow_records_a_table_from_a_custom_analysis(
    prefect_api: str, tmp_path: Path
) -> None:
    params = file_params(tmp_path / "dest", "peaks.bin", b"spectrum", "lab.raw")
    analyze_file_flow = load_flow("flows/analyze_file.py:analyze_file_flow")

    state = analyze_file_flow(
        **params, analysis="tests.prefect_layer.test_analysis:peak_records", return_state=True
    )

    assert state.is_completed(), state.message
    artifacts = read_artifacts(
        f"analysis-{params['file_id'][:12]}", state.state_details.flow_run_id
    )
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    assert json.loads(artifacts[0].data)[2] == {"peak": 2, "position": 20, "size": 8}


@pytest.mark.stack
def test_analyze_flow_fails_clearly_on_a_bad_analysis_name(
    prefect_api: str, tmp_path: Path
) -> None:
    params = file_params(tmp_path / "dest", "a.bin", b"x", "lab.raw")
    analyze_file_flow = load_flow("flows/analyze_file.py:analyze_file_flow")

    state = analyze_file_flow(**params, analysis="msi_prefect.nowhere:run", return_state=True)

    assert state.is_failed()
    assert "'msi_prefect.nowhere' of analysis" in str(state.result(raise_on_failure=False))
