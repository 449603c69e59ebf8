"""Image classification: the embedded digits / MNIST-5k or an own data set, the small CNN or an
own model, cross-entropy per record, accuracy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from dpfl.tasks.base import TASKS, Task, TaskData

__all__ = ["ImageClassification"]


@TASKS.register("image-classification")
class ImageClassification(Task):
    name = "image-classification"
    metric = "accuracy"

    def load_data(self) -> TaskData:
        from dpfl.data import load_dataset

        data = load_dataset(self.cfg.data, self.cfg.seed)
        info = {
            "channels": data.channels,
            "image_size": data.image_size,
            "num_classes": data.num_classes,
            "classes": data.classes,
        }
        return TaskData(data.train, data.test, info)

    def build_model(self, data: TaskData) -> nn.Module:
        from dpfl.models import create_model

        i = data.info
        return create_model(
            self.cfg.model,
            channels=i["channels"],
            image_size=i["image_size"],
            num_classes=i["num_classes"],
        )

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, reduction="none")

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        from dpfl.clients.local_train import evaluate

        loss, acc = evaluate(model, dataset)
        return {"loss": loss, "accuracy": acc}

    def labels(self, dataset: Dataset) -> np.ndarray | None:
        if isinstance(dataset, TensorDataset):
            return dataset.tensors[1].numpy()
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
            return dataset.dataset.tensors[1][list(dataset.indices)].numpy()
        return np.array([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]
