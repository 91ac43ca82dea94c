"""Progress bars: tqdm, shown only on a terminal.

``enabled=False`` (the ``progress=False`` of the library and the CLI's ``-q``) never shows one;
otherwise tqdm's ``disable=None`` leaves the bar out when stderr is not a terminal (a log file, CI,
a pipe), where its carriage-return redraws are noise."""
from __future__ import annotations

from typing import Any


def progress_bar(iterable: Any = None, *, desc: str, enabled: bool = True, **kwargs):
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, disable=None if enabled else True, **kwargs)
