"""Progress display of one epoch: a tqdm bar (loss, accuracy, images per
second, ETA) when tqdm is installed and stderr is a terminal; otherwise, for
logs, one plain line with the same fields every ``interval`` seconds (an
epoch shorter than that prints nothing here; its summary line follows)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, description: str, enabled: bool = True, interval: float = 10.0):
        self.total, self.description, self.enabled, self.interval = total, description, enabled, interval
        self.count, self.start = 0, time.perf_counter()
        self.last_print = self.start
        self.fields: dict = {}
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, **fields) -> None:
        self.count += 1
        self.fields = fields
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._format(with_eta=False), refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last_print >= self.interval and self.count < self.total:
            self.last_print = now
            print(f"{self.description} {self.count}/{self.total} {self._format(with_eta=True)}", file=sys.stderr,
                  flush=True)

    def _format(self, with_eta: bool) -> str:
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
        if with_eta and self.count:
            elapsed = time.perf_counter() - self.start
            text += f" eta={elapsed / self.count * (self.total - self.count):.0f}s"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
