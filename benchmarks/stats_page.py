"""The live stats page's URL as ``fit`` logs it, for scripts that watch a run (benchmarks, docs,
tests)."""

from __future__ import annotations

import logging

from kerasonspark._driver import STATS_PAGE_MESSAGE

__all__ = ["StatsPageWatcher", "stats_page_url"]


def stats_page_url(line: str) -> str | None:
    """The live stats page's URL from a line of the driver's log, or ``None`` if the line has
    none."""
    prefix = STATS_PAGE_MESSAGE.split("%s")[0]
    return line.split(prefix, 1)[1].strip() if prefix in line else None


class StatsPageWatcher(logging.Handler):
    """Catches the live stats page's URL as ``fit`` logs it.

    Attributes:
        url: the page (``/v1/dashboard?token=...``) once logged; ``stats_url`` its JSON.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.url: str | None = None

    @property
    def stats_url(self) -> str | None:
        return self.url.replace("/dashboard?", "/stats?") if self.url else None

    def emit(self, record: logging.LogRecord) -> None:
        self.url = stats_page_url(record.getMessage()) or self.url
