"""``msi-prefect inspect``: the metadata record without Prefect, its arguments checked.

Run in-process through :func:`msi_prefect.cli.main` on the real samples in
``../shared/samples`` (skipped when they are absent) and on files made in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from msi_prefect.cli import main
from msi_prefect.metadata import extract_metadata
from tests.samples import SAMPLES, needs_samples

# The repository's root, found upwards so the file may move into a sub-folder of tests/.
EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE = 0, 1, 2


def without_extraction_time(record: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in record.items() if key != "extracted_at"}


@needs_samples
def test_json_is_the_metadata_topics_record(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["zeiss_sem_512.tif", "gatan_2d.dm3", "simple_signal.nxs"]
    paths = [SAMPLES / name for name in names]

    assert main(["inspect", "--json", *map(str, paths)]) == EXIT_OK

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths)
    for line, path in zip(lines, paths, strict=True):
        record = json.loads(line)
        # Absolute paths are reported by name, as the flow reports a destination's file.
        expected = json.loads(extract_metadata(path, path.name).to_json_bytes())
        assert without_extraction_time(record) == without_extraction_time(expected)
    zeiss = json.loads(lines[0])
    assert zeiss["normalized"]["beam_energy"] == {"value": 5.0, "unit": "keV"}
    assert zeiss["normalized"]["magnification"] == 50000.0


@needs_samples
def test_text_summary_shows_the_normalised_facts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(SAMPLES / "fei_tia_tem_search.emi")]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("fei_tia_tem_search.emi\n")
    assert "  beam energy    200 keV\n" in out
    assert "  magnification  22500 x\n" in out
    assert "  pixel size     y 5.26121 nm, x 5.26121 nm\n" in out
    assert "  operator       ERIC\n" in out
    assert "warning" not in out


def test_relative_paths_are_reported_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run1").mkdir()
    Image.new("L", (8, 6), 1).save(tmp_path / "run1" / "a.png")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--json", "run1/a.png"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["relpath"] == "run1/a.png"


def test_missing_file_and_directory_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "a.png"
    Image.new("L", (8, 6), 1).save(good)

    assert main(["inspect", str(good), str(tmp_path / "gone.tif")]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed for the good file either
    assert f"{tmp_path / 'gone.tif'}: no such file" in captured.err

    assert main(["inspect", str(tmp_path)]) == EXIT_USER_ERROR
    assert "is a directory; name the files in it" in capsys.readouterr().err


def test_unreadable_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "locked.tif"
    path.write_bytes(b"II*\x00")
    # Tests may run as root, who reads anything: let the permission check say no.
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    assert main(["inspect", str(path)]) == EXIT_USER_ERROR
    assert f"{path}: permission denied" in capsys.readouterr().err


def test_no_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["inspect"])
    assert exited.value.code == EXIT_USAGE
    assert "FILE" in capsys.readouterr().err


def test_preview_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.new("L", (8, 6), 1).save(image)

    assert main(["inspect", str(image), str(image), "--preview", str(tmp_path / "p.png")]) == 1
    assert "--preview writes one picture: name one FILE, not 2" in capsys.readouterr().err
    assert main(["inspect", str(image), "--preview", str(tmp_path / "p.jpg")]) == 1
    assert "the picture is a PNG" in capsys.readouterr().err
    assert main(["inspect", str(image), "--preview", str(tmp_path / "no" / "p.png")]) == 1
    assert "does not exist" in capsys.readouterr().err


@needs_samples
def test_preview_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preview.png"
    assert main(["inspect", str(SAMPLES / "zeiss_sem_512.tif"), "--preview", str(out)]) == 0
    assert f"preview: {out} (image, 512 x 384 px)" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (512, 384)


def test_file_without_a_picture_gets_its_metadata_and_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n")
    assert main(["inspect", str(table), "--preview", str(tmp_path / "p.png")]) == 1
    captured = capsys.readouterr()
    assert "extractor      csv 1" in captured.out
    assert "no preview for this kind of file" in captured.err
