"""Files that hold passwords: readable by their owner only, from the moment they exist.

Writing a file and then `chmod`-ing it leaves a window in which the umask's mode (often 0644)
lets anyone on the machine read the password; `os.open` with mode 0600 and `O_EXCL` never has
that window (the umask can only take permissions away, never add any).
"""

from __future__ import annotations

import os
from pathlib import Path

SECRET_FILE_MODE = 0o600


def write_secret_file(path: Path, text: str) -> None:
    """Create `path` holding `text`, mode 0600 from creation; an existing file is replaced (it is
    removed first, so the new one never inherits a looser mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    with os.fdopen(fd, "w") as out:
        out.write(text)
