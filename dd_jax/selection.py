"""Model selection on a validation holdout: the outer iterate the run reports when
config.val_size > 0, chosen on training images the meta-objective never sees."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from dd_jax.checkpoint import has_checkpoint, restore_checkpoint, save_checkpoint
from dd_jax.meta import Learned


class BestOnValidation:
    """The outer iterate with the highest accuracy on the validation holdout so far (the
    first one on ties); with a `path`, written there whenever it changes, so a resumed run
    keeps it. `accuracy` is an `OuterLoop.accuracy_on` of the holdout."""

    def __init__(self, accuracy: Callable[[Learned], dict], val_size: int, path: Path | None = None):
        self.accuracy, self.val_size, self.path = accuracy, val_size, path
        self.learned: Learned | None = None
        self.iteration, self.val_acc = 0, -math.inf

    def restore(self, template: Learned) -> None:
        """Reads the best iterate saved at `path`, if there is one (shapes as `template`)."""
        if self.path is not None and has_checkpoint(self.path):
            self.learned, meta = restore_checkpoint(self.path, template)
            self.iteration, self.val_acc = meta["iteration"], meta["val_acc"]

    def update(self, learned: Learned, iteration: int) -> float:
        """Scores `learned` on the holdout and keeps it (a copy) if it beats the best so far;
        returns its validation accuracy."""
        acc = self.accuracy(learned)["mean"]
        if acc > self.val_acc:
            self.learned = jax.tree.map(np.array, learned)  # a copy: the meta-step donates state
            self.iteration, self.val_acc = iteration, acc
            if self.path is not None:
                save_checkpoint(self.path, self.learned, {"iteration": iteration, "val_acc": acc})
        return acc

    @property
    def selected(self) -> dict:
        """What `DistilledData.selected` records."""
        return {"iteration": self.iteration, "val_acc": self.val_acc, "val_size": self.val_size}
