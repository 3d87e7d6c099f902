"""lib.common.files: atomic writes with the umask's modes, and the output guard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lib.common import files
from lib.common.errors import EXIT_BAD_INPUT, OutputError, ToolkitError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def umask_077():
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.mark.parametrize("write", [
    lambda p: files.write_text(p, "hello"),
    lambda p: files.write_bytes(p, b"hello"),
    lambda p: files.write_json(p, {"a": 1}),
    lambda p: files.write_with(p, lambda tmp: tmp.write_text("x")),
])
def test_new_file_mode_follows_the_umask(tmp_path, umask_022, write):
    path = tmp_path / "sub" / "out.txt"
    write(path)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]  # no temporary file left


def test_the_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert files.umask() == 0o027 and files.file_mode() == 0o640 and files.folder_mode() == 0o750
        assert os.umask(0o027) == 0o027  # still set as the job set it
    finally:
        os.umask(old)


def test_restrictive_umask_is_honoured(tmp_path, umask_077):
    path = files.write_text(tmp_path / "out.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o600


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, umask_022):
    path = files.write_text(tmp_path / "keep.txt", "old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_with(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_temporary_keeps_the_suffix_for_writers_that_choose_by_extension(tmp_path):
    seen = []
    files.write_with(tmp_path / "a.tif", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"")))
    assert seen[0].startswith(".a.tif.") and seen[0].endswith(".partial.tif")


def test_replace_is_atomic_over_an_existing_file(tmp_path):
    path = files.write_json(tmp_path / "x.json", {"v": 1})
    files.write_json(path, {"v": 2})
    assert path.read_text().strip().endswith("}") and '"v": 2' in path.read_text()


@pytest.mark.parametrize("output, inputs, bad", [
    ("out", {"mask_folder": "masks"}, False),
    ("masks", {"mask_folder": "masks"}, True),         # the same folder
    ("masks/pred", {"mask_folder": "masks"}, True),    # inside an input folder
    ("data", {"image_folder": "data/images"}, True),   # holds an input folder
    ("out", {"image_folder": "images", "mask_folder": None}, False),
])
def test_outputs_never_go_into_an_input_folder(tmp_path, output, inputs, bad):
    for folder in ("masks", "data/images", "images"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    inputs = {k: (tmp_path / v if v else None) for k, v in inputs.items()}
    if bad:
        with pytest.raises(OutputError, match="must not be, contain or lie inside --") as info:
            files.check_not_inside(tmp_path / output, inputs)
        assert isinstance(info.value, ToolkitError) and info.value.exit_code == EXIT_BAD_INPUT
    else:
        files.check_not_inside(tmp_path / output, inputs)


def test_symbolic_links_do_not_hide_an_input_folder(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "masks")
    with pytest.raises(OutputError):
        files.check_not_inside(tmp_path / "alias", {"mask_folder": tmp_path / "masks"})
