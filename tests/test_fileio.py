"""Outputs written whole (a temp name, then a rename) keep the modes any file written here would have."""

import os
import stat

import pytest

from kftune.fileio import atomic_dir, umask, write_json


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_outputs_take_the_umask_not_the_temp_files_private_modes(tmp_path, mask):
    """mkdtemp and mkstemp create 0700 and 0600: a model folder written by one uid could not be served by another."""
    before = os.umask(mask)
    try:
        assert umask() == mask
        with atomic_dir(tmp_path / "model") as out:
            (out / "weights").write_bytes(b"w")
        write_json(tmp_path / "card.json", {"a": 1})
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "card.json").stat().st_mode) == 0o666 & ~mask
