"""Progress bars: the one place that decides whether and where progress is shown.

Bars go to stderr (stdout stays clean for ``--json``) and only when stderr is a terminal; callers
pass ``enabled=False`` for quiet runs (the CLI's ``--quiet`` / ``--json``).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar on stderr, disabled unless ``enabled`` and stderr is a TTY; transient (``leave=False``)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=kw.pop("leave", False),
                disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True, **kw)
