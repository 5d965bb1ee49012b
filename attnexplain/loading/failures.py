"""One error line for whatever code running during a load raises: a trusted file's (unpickling,
TorchScript), a plugin's, or the user's own class. torch's log lines and warnings are kept back
while it runs."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

from ..errors import AttnExplainError, ModelLoadError


@contextmanager
def load_failures_reported(what: str) -> Iterator[None]:
    """Turn anything a trusted file's code raises into one ModelLoadError line.

    SystemExit included: a pickle that calls ``sys.exit(0)`` must not end the program silently with
    success. torch's own log lines and warnings are kept back (torch.export.load logs a whole
    traceback before it raises); the first error it logged is the cause worth showing.
    """
    with torch_logs_kept() as logged:
        try:
            yield
        except KeyboardInterrupt:
            raise
        except AttnExplainError:
            raise
        except BaseException as error:  # noqa: BLE001 - SystemExit and friends too, see above
            cause = next((record.exc_info[1] for record in logged if record.exc_info), error)
            raise ModelLoadError(f"{what}: {type(cause).__name__}: {first_line(cause)}") from None


class _KeptRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def torch_logs_kept() -> Iterator[list[logging.LogRecord]]:
    """Keep torch's log records and warnings from the terminal for the duration; yield the records."""
    logger = logging.getLogger("torch")
    handler, propagate = _KeptRecords(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
