"""Log lines as JSON objects or text, carrying the job a worker is handling."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from shared.logs import configure_logging, log_context


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root():
    """The root logger's handlers and level, put back afterwards."""
    logger = logging.getLogger()
    saved = (list(logger.handlers), logger.level)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_service_level_logger_and_the_jobs_context(root):
    out = io.StringIO()
    configure_logging("trainer", level="INFO", log_format="json", stream=out)
    log = logging.getLogger("services.trainer.handler")
    with log_context(job_id="j-1", stage="train", attempt=2, message_type="TrainModel"):
        log.info("step %d of %d", 3, 10)
    log.warning("idle")
    log.debug("not at INFO")
    inside, outside = _lines(out)
    assert {k: v for k, v in inside.items() if k != "time"} == {
        "level": "INFO",
        "logger": "services.trainer.handler",
        "message": "step 3 of 10",
        "service": "trainer",
        "job_id": "j-1",
        "stage": "train",
        "attempt": 2,
        "message_type": "TrainModel",
    }
    assert inside["time"].endswith("+00:00")  # UTC, ISO 8601
    assert set(outside) == {"time", "level", "logger", "message", "service"}


def test_a_traceback_stays_inside_its_json_line(root):
    out = io.StringIO()
    configure_logging("evaluator", level="INFO", log_format="json", stream=out)
    try:
        raise ValueError("bad row 7")
    except ValueError:
        logging.getLogger("x").exception("failed")
    (line,) = _lines(out)
    assert "ValueError: bad row 7" in line["exc_info"] and line["message"] == "failed"


def test_auto_is_text_on_a_terminal_and_json_elsewhere(root):
    terminal, pipe = _Terminal(), io.StringIO()
    configure_logging("api", level="INFO", log_format="auto", stream=terminal)
    with log_context(job_id="j-2", stage="publish", attempt=1):
        logging.getLogger("y").info("uploaded")
    assert terminal.getvalue().rstrip().endswith(" api INFO y: uploaded [j-2 publish #1]")
    configure_logging("api", level="INFO", log_format="auto", stream=pipe)
    logging.getLogger("y").info("uploaded")
    assert _lines(pipe)[0]["message"] == "uploaded"
    assert len(root.handlers) == 1  # configured twice: one handler, not two


def test_the_context_ends_with_its_block_and_stays_on_its_thread(root):
    out = io.StringIO()
    configure_logging("trainer", level="INFO", log_format="json", stream=out)
    log = logging.getLogger("z")
    with log_context(job_id="j-3", stage="train"):
        with log_context(attempt=4):
            log.info("nested")
        other = threading.Thread(target=lambda: log.info("another thread"))
        other.start()
        other.join()
    log.info("after")
    nested, thread, after = _lines(out)
    assert (nested["job_id"], nested["stage"], nested["attempt"]) == ("j-3", "train", 4)
    assert "job_id" not in thread and "job_id" not in after
