"""What rank 0 reports while training: MLflow params and metrics, and progress lines."""

from __future__ import annotations

import sys
import time
from typing import Any


class RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run (no MLflow callback in Train v2)."""

    def __init__(self, tracking: dict[str, str] | None) -> None:
        self.client = None
        if tracking:
            import mlflow
            from mlflow import MlflowClient

            mlflow.set_tracking_uri(tracking["uri"])
            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def params(self, params: dict[str, Any]) -> None:
        if self.client is not None:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def progress(line: str) -> None:
    """A progress line on the process's real stderr (Ray forwards it to the driver once).

    Train v2 patches ``print`` to tee stdout/stderr into its logger, which shows
    every line twice; writing to ``sys.__stderr__`` bypasses that.
    """
    print(line, file=sys.__stderr__, flush=True)
