"""The LightningModule's metrics: accuracy, and Matthews correlation for CoLA, as the paper reports them."""

from __future__ import annotations

import pytest
import torch

from partial_lora.training.module import METRICS
from tests.conftest import compose_config


def test_cola_uses_matthews_correlation_and_the_others_accuracy():
    predictions = torch.tensor([1, 1, 0, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 0, 1, 1])
    metric = METRICS[compose_config("dataset=cola").dataset.metric](2)
    metric.update(predictions, labels)
    # tp=2 tn=2 fp=1 fn=1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert float(metric.compute()) == pytest.approx(1 / 3)
    for task in ("sst2", "mrpc", "qnli", "rte"):
        accuracy = METRICS[compose_config(f"dataset={task}").dataset.metric](2)
        accuracy.update(predictions, labels)
        assert float(accuracy.compute()) == pytest.approx(4 / 6)
