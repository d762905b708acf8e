"""The callback long steps report progress through: (what is happening, steps done, steps in all).

Library code only calls it; the CLI draws it as a progress bar (`slmflow.cli.progress_bar`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Progress = Callable[[str, int, int], None]


@contextmanager
def reading(
    progress: Progress | None, message: str, total_bytes: int, under: Path, skip: Path | None = None
) -> Iterator[None]:
    """Report, in MB, how much of the files under `under` this process has read, while the block runs.

    For uploads done by a library that takes a path and reports nothing (MLflow's artifact upload):
    the operating system knows each open file's read position, so a watcher thread reads it from
    there (Linux; elsewhere only the message shows). Files under `skip` (a copy's source) don't count.
    """
    if progress is None:
        yield
        return
    import psutil

    stop = threading.Event()
    total_mb = max(1, total_bytes // 2**20)

    def watch() -> None:
        finished: dict[str, int] = {}  # file -> its size, once seen open and then closed
        reading_now: dict[str, int] = {}
        shown = 0
        me = psutil.Process()
        while not stop.wait(0.2):
            try:
                files = me.open_files()
            except psutil.Error:
                continue
            seen = {
                f.path: getattr(f, "position", 0)
                for f in files
                if f.mode == "r" and _inside(f.path, under) and not (skip and _inside(f.path, skip))
            }
            for path in reading_now.keys() - seen.keys():
                finished[path] = _size(path)
            reading_now = seen
            done = sum(size for path, size in finished.items() if path not in seen) + sum(seen.values())
            # A file read twice (checked, then sent) would move the bar back: it only moves forward.
            shown = max(shown, min(done // 2**20, total_mb))
            progress(message, shown, total_mb)

    progress(message, 0, total_mb)
    watcher = threading.Thread(target=watch, name="slmflow-read-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    progress(message, total_mb, total_mb)


def _inside(path: str, folder: Path) -> bool:
    return path.startswith(str(folder).rstrip("/") + "/")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
