"""The GLUE tasks shipped inside the package (original TSVs, see glue_data/README.md)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...]
    f1_label: str | None  # the positive class whose F1 is reported
    #: the dev accuracy whose first round ``hlora compare`` reports by default: what centralized LoRA of the
    #: default MiniLM reaches in a few rounds (docs/results.md)
    target: float

    def path(self, split: str) -> Path:
        return Path(str(resources.files("hlora.data") / "glue_data" / self.folder / f"{split}.tsv"))


GLUE: dict[str, GlueTask] = {
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "1", 0.75),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), None, 0.55),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), "1", 0.80),
}
#: ``hlora compare``'s target for a task that is not one of :data:`GLUE` (files, ``hf:NAME``)
DEFAULT_TARGET = 0.75


def default_target(task: str | None) -> float:
    """The ``--target`` of ``hlora compare`` when none is given: the GLUE task's, else :data:`DEFAULT_TARGET`."""
    glue = GLUE.get((task or "").lower())
    return glue.target if glue else DEFAULT_TARGET
