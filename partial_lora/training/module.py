"""The LightningModule shared by every backbone and method (SPEC 5: AdamW, cosine-annealed learning rate)."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch.nn.functional import cross_entropy
from torchmetrics import Accuracy, MatthewsCorrCoef, Metric

METRICS: dict[str, Callable[[int], Metric]] = {
    "accuracy": lambda num_classes: Accuracy(task="multiclass", num_classes=num_classes),
    "matthews": lambda num_classes: MatthewsCorrCoef(task="multiclass", num_classes=num_classes),
}


class ClassificationModule(L.LightningModule):
    """Cross-entropy fine-tuning of ``model`` (any module returning ``.logits``), metrics x100 as in the paper.

    Checkpoints hold trainable parameters only: the frozen backbone is rebuilt from its config, and
    saving it per run would cost gigabytes at LLaMA scale.
    """

    def __init__(self, model: torch.nn.Module, num_labels: int, metric: str,
                 optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__()
        # from_pretrained leaves models in eval mode and Lightning keeps submodule modes: enable dropout.
        self.model = model.train()
        self.optimizer_factory = optimizer
        self.metric_name = metric
        self.val_metric = METRICS[metric](num_labels)
        self.test_metric = METRICS[metric](num_labels)
        self.strict_loading = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Labels go into the model so that adapters with their own loss terms add them (AdaLoRA's
        # orthogonal regulariser); the backbone's loss is cross-entropy for classification.
        outputs = self.model(**batch)
        loss = outputs.loss if outputs.loss is not None else cross_entropy(outputs.logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: Metric, stage: str) -> None:
        logits = self.model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        metric.update(logits.argmax(dim=-1), batch["labels"])
        self.log(f"{stage}/loss", cross_entropy(logits, batch["labels"]), batch_size=len(batch["labels"]))
        self.log(f"{stage}/metric", metric, prog_bar=True, on_epoch=True, on_step=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.model)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                    if key in trainable}
