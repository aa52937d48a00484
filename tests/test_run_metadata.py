"""vlmtune.json: written whole or not at all, read with errors that name the file, its file list read leniently."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.run_metadata import METADATA_FILE, listed_files, read_metadata, remove_metadata, write_metadata


def test_a_write_cut_short_keeps_the_earlier_file_whole(tmp_path, monkeypatch):
    write_metadata(tmp_path, {"family": "qwen2_vl", "files": ["adapter_model.safetensors"]})
    real = Path.write_text

    def disk_fills(self, text, *args, **kwargs):
        real(self, text[:7], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        write_metadata(tmp_path, {"family": "llava"})
    monkeypatch.undo()
    assert read_metadata(tmp_path) == {"family": "qwen2_vl", "files": ["adapter_model.safetensors"]}
    assert [p.name for p in tmp_path.iterdir()] == [METADATA_FILE]  # no temporary file left beside it


def test_read_errors_name_the_file_and_the_file_list_is_read_leniently(tmp_path):
    assert read_metadata(tmp_path) == {} and listed_files(tmp_path) is None
    (tmp_path / METADATA_FILE).write_text('{"files": ["a"')
    with pytest.raises(VlmtuneError, match=f"{tmp_path / METADATA_FILE} is not valid JSON"):
        read_metadata(tmp_path)
    assert listed_files(tmp_path) is None
    write_metadata(tmp_path, {"files": ["a", "b"]})
    assert listed_files(tmp_path) == ["a", "b"]
    remove_metadata(tmp_path)
    assert not (tmp_path / METADATA_FILE).exists()
