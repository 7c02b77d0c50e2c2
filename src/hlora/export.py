"""Write a global update as a standard PEFT LoRA adapter directory (loads with plain PEFT).

The adapter holds, per adapted module, factors of the smallest rank that keeps the whole update (or a
chosen rank r: the best rank-r truncation), at scaling 1 (lora_alpha = r), and the trained head in
``modules_to_save``. ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE),
DIR)`` then computes exactly W0 + dW.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from hlora.factors import Adapter, Factor
from hlora.linalg import SVD, factored_svd

#: singular values below this fraction of the largest are rounding noise of a float32 sum
RANK_TOL = 1e-6


def adapter_svd(adapter: Adapter) -> dict[str, SVD]:
    """Each module's update as a thin SVD at its numerical rank."""
    return {m: factored_svd([f.B * f.scale], [f.A], [1.0], tol=RANK_TOL) for m, f in adapter.items()}


def energy_kept(svds: dict[str, SVD], rank: int | None) -> float:
    """Fraction of the whole adapter's squared Frobenius norm that rank-``rank`` truncations keep."""
    kept = total = 0.0
    for svd in svds.values():
        energy = svd.S.double() ** 2
        kept += float(energy[: svd.rank if rank is None else rank].sum())
        total += float(energy.sum())
    return 1.0 if total == 0 else kept / total


def truncated(svds: dict[str, SVD], rank: int | None) -> tuple[Adapter, float]:
    """Factors (scaling 1) of the rank-``rank`` truncation (None: full), and the energy kept overall."""
    out = {}
    for m, svd in svds.items():
        r = svd.rank if rank is None else min(rank, svd.rank)
        t = svd.truncate(max(r, 1)) if svd.rank else svd
        if t.rank == 0:  # an all-zero update still needs a rank-1 slot in a PEFT adapter
            d, k = svd.U.shape[0], svd.Vt.shape[1]
            t = SVD(torch.zeros(d, 1), torch.zeros(1), torch.zeros(1, k))
        out[m] = Factor(t.U * t.S, t.Vt, 1.0)
    return out, energy_kept(svds, rank)


def save_peft_adapter(
    out: Path,
    adapter: Adapter,
    head: dict[str, torch.Tensor],
    base_model: str,
    task_type: str = "SEQ_CLS",
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT's LoRA."""
    from peft import LoraConfig

    out.mkdir(parents=True, exist_ok=True)
    ranks = {m: f.rank for m, f in adapter.items()}
    top = max(ranks.values())
    head_modules = sorted({name.split(".")[0] for name in head})
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in adapter}),
        rank_pattern={m: r for m, r in ranks.items() if r != top},
        alpha_pattern={m: r for m, r in ranks.items() if r != top},
        modules_to_save=head_modules or None,
        task_type=task_type,
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out))
    tensors = {}
    for m, f in adapter.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = (f.A * f.scale).float().contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = f.B.float().contiguous()
    for name, t in head.items():
        tensors[f"base_model.model.{name}"] = t.float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out
