"""Run a user's analysis on one rebuilt file and record its result in the Prefect UI.

An analysis is any importable callable, named ``package.module:function`` (or
``package.module:Class.method``), that takes the file and its metadata and returns a
JSON-compatible value::

    def my_analysis(path: pathlib.Path, metadata: dict) -> dict:
        ...

``metadata`` is :meth:`~msi_prefect.metadata.FileMetadata.to_json_dict` of the file plus
``topic``, ``file_id``, ``generation`` and ``url``. The package must be installed where the
flow runs (the worker's environment). The ``analyze-file`` deployment runs
:func:`analyze_file` for every ``msi.file.reconstructed`` event; the result becomes an
artifact ``analysis-<first 12 digits of the file id>`` (a table when the analysis returns a
list of records, markdown otherwise) and the event ``msi.file.analyzed`` carries it (when
small) in its payload. :mod:`msi_prefect.examples.analysis` has an example.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from msi_prefect.errors import MsiError
from msi_prefect.metadata import FileMetadata, extract_metadata
from msi_prefect.prefect_layer.event_outbox import emit_downstream_event
from msi_prefect.prefect_layer.events import EventName, file_event
from msi_prefect.prefect_layer.file_history import record_file_step
from msi_prefect.prefect_layer.flow_inputs import (
    FileInputError,
    RebuiltFile,
    retry_unless_input_error,
)
from msi_prefect.prefect_layer.metadata_tasks import artifact_key

__all__ = [
    "DEFAULT_ANALYSIS",
    "AnalysisError",
    "AnalysisResult",
    "AnalysisSpecError",
    "analysis_markdown",
    "analyze_file",
    "load_callable",
]

#: The analysis the embedded stack runs when none is named.
DEFAULT_ANALYSIS = "msi_prefect.examples.analysis:summarize"
#: Largest result (JSON characters) carried in the ``msi.file.analyzed`` event payload.
MAX_EVENT_RESULT_CHARS = 8 * 1024
#: Largest JSON shown in the markdown artifact.
MAX_ARTIFACT_JSON_CHARS = 20_000
#: Rows of a table artifact (a longer list of records is cut).
MAX_TABLE_ROWS = 500
#: Longest value shown in a markdown table cell.
MAX_CELL_CHARS = 200
ANALYSIS_RETRIES = 1
ANALYSIS_RETRY_DELAY_S = 10

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*"
_SPEC_RE = re.compile(rf"{_DOTTED}:{_DOTTED}")
_CELL_ESCAPES = str.maketrans({"|": "\\|", "\n": " ", "\r": " ", "<": "&lt;", ">": "&gt;"})


class AnalysisSpecError(FileInputError):
    """An analysis name that does not lead to a callable."""


class AnalysisError(MsiError):
    """The analysis raised, or returned something that is not JSON."""


@dataclass(frozen=True)
class AnalysisResult:
    """What one analysis found about one file.

    Attributes:
        relpath: Relative POSIX path of the file.
        analysis: The analysis, as ``package.module:function``.
        result: Its JSON-compatible return value.
    """

    relpath: str
    analysis: str
    result: Any


def load_callable(spec: str) -> Callable[..., Any]:
    """Import the callable named ``package.module:function``.

    Args:
        spec: Module path, a colon, and the attribute path inside the module (e.g.
            ``my_lab.analysis:peak_table`` or ``my_lab.analysis:Analyzer.run``).

    Returns:
        The callable.

    Raises:
        AnalysisSpecError: The spec is malformed, the module cannot be imported (not
            installed, or its import fails), the attribute is missing, or it is not callable.
    """
    if not isinstance(spec, str) or not _SPEC_RE.fullmatch(spec.strip()):
        raise AnalysisSpecError(
            f"analysis {spec!r} is not of the form 'package.module:function' (Python names "
            "separated by dots, one colon between the module and the function)"
        )
    module_name, _, attr_path = spec.strip().partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise AnalysisSpecError(
                f"module {module_name!r} of analysis {spec!r} cannot be found; is its package "
                "installed in the environment the flow runs in (the worker's)?"
            ) from exc
        raise AnalysisSpecError(
            f"importing module {module_name!r} of analysis {spec!r} failed: it needs "
            f"{missing!r}, which is not installed"
        ) from exc
    except Exception as exc:
        raise AnalysisSpecError(
            f"importing module {module_name!r} of analysis {spec!r} failed: {exc!r}"
        ) from exc
    target: Any = module
    names = attr_path.split(".")
    for depth, name in enumerate(names):
        if not hasattr(target, name):
            owner = (
                f"module {module_name!r}"
                if depth == 0
                else repr(":".join((module_name, ".".join(names[:depth]))))
            )
            raise AnalysisSpecError(f"{owner} has no attribute {name!r} (analysis {spec!r})")
        target = getattr(target, name)
    if not callable(target):
        raise AnalysisSpecError(
            f"analysis {spec!r} is a {type(target).__name__}, not a function or other callable"
        )
    return target


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    return text.translate(_CELL_ESCAPES)


def analysis_markdown(relpath: str, spec: str, result: Any) -> str:
    """Markdown showing an analysis result: a key/value table for a dict, and the JSON."""
    lines = [f"### Analysis of {_cell(relpath)}", "", f"Analysis: `{_cell(spec)}`", ""]
    if isinstance(result, dict) and result:
        lines += ["| Key | Value |", "| --- | --- |"]
        lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in result.items()]
        lines.append("")
    shown = json.dumps(result, indent=2, ensure_ascii=False)
    if len(shown) > MAX_ARTIFACT_JSON_CHARS:
        shown = shown[:MAX_ARTIFACT_JSON_CHARS] + "\n… (cut)"
    lines += ["```json", shown.replace("```", "` ` `"), "```"]
    return "\n".join(lines) + "\n"


def _is_records(result: Any) -> bool:
    """Whether ``result`` is a non-empty list of dicts (shown as a table)."""
    return (
        isinstance(result, list) and bool(result) and all(isinstance(row, dict) for row in result)
    )


def _checked_json(spec: str, result: Any) -> str:
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AnalysisError(
            f"analysis {spec!r} returned a {type(result).__name__} that is not JSON-compatible "
            f"(return dicts, lists, strings, numbers, booleans or None): {exc}"
        ) from exc


@task(
    name="analyze-file",
    task_run_name="analyze {file.path}",
    retries=ANALYSIS_RETRIES,
    retry_delay_seconds=ANALYSIS_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
)
def analyze_file(
    file: RebuiltFile,
    analysis: str = DEFAULT_ANALYSIS,
    dedup_key: str | None = None,
    metadata: FileMetadata | None = None,
) -> AnalysisResult:
    """Run an analysis on a rebuilt file, record its result, emit ``msi.file.analyzed``.

    Args:
        file: The rebuilt file, validated from the event parameters.
        analysis: The callable, as ``package.module:function``.
        dedup_key: What makes the event unique besides file, generation and analysis.
        metadata: The file's metadata, extracted by the same run just before (a batch
            run); None: extracted here.

    Returns:
        The analysis result.

    Raises:
        AnalysisSpecError: ``analysis`` does not name a callable (no retry).
        FileChangedError: The file is gone or no longer the one announced (no retry).
        AnalysisError: The analysis raised, or returned something that is not JSON.
    """
    logger = get_run_logger()
    function = load_callable(analysis)
    file.check_unchanged(hash_content=False)
    if metadata is None:
        try:
            # The reassembler verified the content's SHA-256 when it rebuilt the file, and
            # the size still matches: the analysis does not read the whole file to hash it.
            metadata = extract_metadata(
                file.local_path, file.path.as_posix(), known_sha256=file.sha256
            )
        except (OSError, ValueError) as exc:
            raise FileInputError(f"cannot read {file.local_path}: {exc}") from exc
    facts_for_analysis: dict[str, Any] = {
        **metadata.to_json_dict(),
        "topic": file.topic,
        "file_id": file.file_id,
        "generation": file.generation,
        "url": file.url,
    }
    logger.info("Running %s on %s", analysis, file.path)
    try:
        result = function(file.local_path, facts_for_analysis)
    except Exception as exc:
        raise AnalysisError(f"analysis {analysis!r} failed on {file.path}: {exc!r}") from exc
    encoded = _checked_json(analysis, result)
    relpath = file.path.as_posix()
    key = artifact_key("analysis", file.file_id)
    description = f"{analysis} on {relpath} (generation {file.generation})"
    if _is_records(result):
        create_table_artifact(table=result[:MAX_TABLE_ROWS], key=key, description=description)
    else:
        create_markdown_artifact(
            markdown=analysis_markdown(relpath, analysis, result), key=key, description=description
        )
    small = len(encoded) <= MAX_EVENT_RESULT_CHARS
    facts = file.facts(analysis=analysis, result=result if small else None, result_cut=not small)
    unique = f"{dedup_key or file.file_id}:{analysis}"
    event = file_event(EventName.ANALYZED, facts, unique)
    emit_downstream_event(event)
    record_file_step(event)
    logger.info("Analysis %s of %s done", analysis, file.path)
    return AnalysisResult(relpath=relpath, analysis=analysis, result=result)
