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

    def path(self, split: str) -> Path:
        return Path(str(resources.files("hlora.data") / "glue_data" / self.folder / f"{split}.tsv"))


GLUE: dict[str, GlueTask] = {
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "1"),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), None),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), "1"),
}
