"""Progress display: a tqdm bar on a terminal, plain lines otherwise (logs, subprocesses)."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar on a terminal; one plain line per update otherwise (logs, subprocesses)."""

    def __init__(
        self, total: int, desc: str, *, enabled: bool, initial: int = 0, lines: bool = True
    ) -> None:
        self.enabled = enabled
        self.total = total
        self.desc = desc
        self.count = initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        elif not lines:
            self.enabled = False

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.count += count
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(count)
        else:
            details = " ".join(f"{key} {value}" for key, value in postfix.items())
            print(f"{self.desc} {self.count}/{self.total} {details}".rstrip(), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def announce(line: str) -> None:
    """Print a result line on stderr without breaking a progress bar on a terminal."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
