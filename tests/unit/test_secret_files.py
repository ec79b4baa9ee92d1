"""Password files are the owner's alone from the moment they exist (devstack/secret_files.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from devstack import components, supervisor
from devstack.secret_files import write_secret_file


def test_a_secret_file_is_0600_from_creation_under_a_permissive_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_modes: list[int] = []
    real_open = os.open

    def open_and_look(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        seen_modes.append(stat.S_IMODE(os.fstat(fd).st_mode))  # before a byte is written
        return fd

    monkeypatch.setattr(os, "open", open_and_look)
    old = os.umask(0)  # everything the creator asks for is granted
    try:
        path = tmp_path / "admin-password"
        path.write_text("old")
        path.chmod(0o644)  # a looser file left from before is replaced, not reused
        write_secret_file(path, "s3cret")
    finally:
        os.umask(old)
    assert seen_modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "s3cret"


def test_the_stack_writes_passwords_only_through_the_helper() -> None:
    """No write-then-chmod left in the stack's code."""
    for module in (components, supervisor):
        source = Path(module.__file__ or "").read_text()
        assert ".chmod(" not in source, module.__name__
        assert "write_secret_file(" in source, module.__name__
