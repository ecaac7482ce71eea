"""A job's training code run as a child process of a site.

    python -m hauler.client.child JOB_ID APP_DIR EXECUTOR_JSON

The site passes one end of a socket pair (its descriptor in HAULER_TRAINER_FD) for the small
messages; the model itself is the site's model file, which this process maps as well.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from hauler.client.api import TRAINER_FD_VARIABLE, SocketChannel, TrainerLink
from hauler.client.trainer import run_trainer
from hauler.core.config import ExecutorConfig


def main(argv: list[str]) -> int:
    job_id, app_dir, executor_json = argv
    descriptor = int(os.environ.pop(TRAINER_FD_VARIABLE))
    link = TrainerLink(SocketChannel(socket.socket(fileno=descriptor)), in_process=False)
    executor = ExecutorConfig.model_validate_json(executor_json)
    return 0 if run_trainer(executor, Path(app_dir), job_id, link, process_wide=True) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
