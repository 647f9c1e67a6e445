"""Keep the running pipeline current without a restart, and never swap in a broken one.

The worker asks for the pipeline once per batch. At most every ``interval`` seconds (or at
once after SIGHUP) the holder compares the files' mtimes with those the pipeline was built
from; when they changed it loads them again. A valid edit replaces the pipeline; an invalid
one is logged with every error and the last good pipeline stays.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from mailgw.filters.engine import Pipeline
from mailgw.filters.loader import FilterError, load_pipeline, snapshot
from mailgw.filters.registry import Registry
from mailgw.settings import Settings

log = logging.getLogger(__name__)


class PipelineHolder:
    def __init__(self, directory: Path, settings: Settings, templates_dir: Path | None,
                 interval: float = 2.0, registry: Registry | None = None):
        self.directory = directory
        self.settings = settings
        self.templates_dir = templates_dir
        self.interval = interval
        self.registry = registry
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._forced = threading.Event()
        self._failed: dict[str, tuple[int, int]] | None = None  # the snapshot that failed last
        # The first load must succeed: starting with a broken pipeline is refused (by the
        # caller, which reports the errors).
        self.pipeline = self._load()

    def _load(self) -> Pipeline:
        return load_pipeline(self.directory, self.settings, self.templates_dir, self.registry)

    def request_reload(self) -> None:
        """Called from a SIGHUP handler: load the files now, off the signal handler's thread
        (the worker may be idle; the admin wants to see the result in the log at once)."""
        self._forced.set()
        threading.Thread(target=self.current, name="filters-reload", daemon=True).start()

    def current(self) -> Pipeline:
        now = time.monotonic()
        if not self._forced.is_set() and now - self._checked < self.interval:
            return self.pipeline
        with self._lock:
            forced = self._forced.is_set()
            self._forced.clear()
            self._checked = now
            try:
                files = snapshot(self.directory)
            except OSError as exc:
                log.error("filters: cannot read %s: %s; keeping the running pipeline",
                          self.directory, exc)
                return self.pipeline
            if not forced and (files == self.pipeline.files or files == self._failed):
                return self.pipeline
            try:
                new = self._load()
            except FilterError as exc:
                self._failed = files
                log.error("filters: edit refused, keeping the last good pipeline (%d rules):\n%s",
                          len(self.pipeline.rules), "\n".join(exc.errors))
                return self.pipeline
            self._failed = None
            self.pipeline = new
            log.info("filters: loaded %d rule(s) from %s", len(new.rules), self.directory)
            return new
