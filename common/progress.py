"""Console output of long jobs: one logging setup and one progress bar.

Status messages of the jobs go through Python logging (a logger per module); what a command
prints as its result (JSON, a summary line) goes to stdout and is no concern of this module.
``setup_logging`` maps the command line's ``--quiet`` / ``--verbose`` to WARNING / DEBUG
(default INFO) for prism's own packages and keeps third-party loggers at WARNING.

``progress_bar`` draws a tqdm bar (count, rate, ETA) only when its stream is a terminal and
INFO messages are on: a carriage-return bar written into a log file or into captured output is
unreadable. Elsewhere it is silent, or writes a plain log line every ``log_every_s`` seconds, so
a long job still shows that it moves in a log file. Log lines written while a bar is drawn go
through ``tqdm.write``, above the bar, instead of breaking it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

from tqdm import tqdm

PACKAGES = ("prism_cli", "common", "components", "pipelines", "training", "serving",
            "benchmarks")  # the loggers that --quiet / --verbose set
NOISY = ("mlflow", "ray", "urllib3", "botocore", "boto3", "s3transfer", "filelock",
         "matplotlib", "PIL", "alembic", "git")  # third-party loggers held at WARNING

_log = logging.getLogger(__name__)
_level: int | None = None  # the level of the last setup_logging in this process


def level_of(quiet: bool = False, verbose: bool = False) -> int:
    """The logging level of the command-line flags: WARNING, DEBUG or INFO."""
    if quiet and verbose:
        raise ValueError("--quiet and --verbose exclude each other")
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


class _Formatter(logging.Formatter):
    """Plain messages at INFO; ``warning:`` / ``error:`` before worse ones; the logger's name
    before DEBUG messages (which module said it matters there)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        if record.levelno < logging.INFO:
            return f"debug [{record.name}]: {text}"
        return text


class ConsoleHandler(logging.Handler):
    """Writes each record to the current ``sys.stderr`` (read at every message, so redirections
    made later, as by test runners, are honoured), through ``tqdm.write`` while a bar is drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr
            if len(getattr(tqdm, "_instances", ())):  # a bar is drawn
                tqdm.write(text, file=stream)
            else:
                stream.write(text + "\n")
                stream.flush()
        except Exception:  # a logging call never raises into the job
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Send log records to stderr: prism's packages at ``level``, third-party at WARNING.

    Calling it again replaces the earlier setup (one handler on the root logger)."""
    global _level
    _level = level
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(h)
    handler = ConsoleHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # anything not named below: warnings and errors only
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def configured_level() -> int:
    """The level ``setup_logging`` set in this process (INFO when it was not called): what
    worker processes are given so that they follow ``--quiet`` / ``--verbose``."""
    return logging.INFO if _level is None else _level


def ensure_logging(level: int = logging.INFO) -> None:
    """``setup_logging(level)`` in a process that has none (a Ray worker, a library caller)."""
    if not any(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers):
        setup_logging(level)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """A count toward ``total`` with rate and ETA: a tqdm bar on a terminal, else plain log
    lines every ``log_every_s`` seconds (none when it is None). Use as a context manager or
    call ``close``."""

    def __init__(self, total: float | None, desc: str, unit: str, initial: float,
                 log: logging.Logger, log_every_s: float | None, bar: Any) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._log, self._every, self._bar = log, log_every_s, bar
        self._t0 = self._last = time.monotonic()
        self._start = initial
        self._postfix: dict[str, Any] = {}

    @property
    def drawn(self) -> bool:
        """Whether a bar is drawn (a terminal, INFO on)."""
        return self._bar is not None

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._every is not None and time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self._log.info(self.line())

    def set_postfix(self, **values: Any) -> None:
        """Extra numbers after the count (the bar's postfix; appended to log lines)."""
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """The state as one plain line: count, rate, elapsed and ETA."""
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total:g}" if self.total else ""
        eta = f", ETA {_duration((self.total - self.n) / rate)}" \
            if self.total and rate > 0 and self.n < self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
        return (f"{self.desc}: {self.n:g}{of} {self.unit} ({rate:.3g} {self.unit}/s, "
                f"{_duration(elapsed)} elapsed{eta}{extra})")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: float | None, desc: str, unit: str = "img", *, initial: float = 0,
                 log: logging.Logger | None = None, log_every_s: float | None = 60.0,
                 enabled: bool = True, terminal: bool | None = None,
                 file: IO[str] | None = None) -> ProgressBar:
    """A progress count for a long job (see the module doc).

    ``log`` is the job's logger: its level decides whether anything shows (INFO); ``terminal``
    overrides the check of ``file`` (default ``sys.stderr``); ``enabled=False`` shows nothing.
    """
    log = log or _log
    file = file if file is not None else sys.stderr
    shown = enabled and log.isEnabledFor(logging.INFO)
    bar = None
    if shown and (terminal if terminal is not None else _is_terminal(file)):
        bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file,
                   dynamic_ncols=True, unit_scale=bool(total and total >= 100_000),
                   smoothing=0.1)
    return ProgressBar(total, desc, unit, initial, log, log_every_s if shown else None, bar)
