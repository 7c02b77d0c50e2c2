"""How far the frozen MiniLM's features are from separating MRPC: logistic regression on MRPC train,
scored on dev, for four features of the frozen base (no LoRA, no fine-tuning).

    python benchmarks/linear_probe.py [--threads 2]

Features: the [CLS] state of the pair encoding, the pooler's output, the mean of the last layer's states
(pair encoding), and the sentence-transformers use of this model (each sentence embedded alone, mean
pooled and normalised; features |u - v|, u * v and the cosine). Needs scikit-learn.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from hlora.data import load_task
from hlora.model import resolve_model_path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


def features(model, tok, examples, batch: int = 64) -> dict[str, np.ndarray]:
    out: dict[str, list[torch.Tensor]] = {"cls": [], "pooler": [], "mean": [], "sentence-pair": []}
    for i in range(0, len(examples.labels), batch):
        a, b = examples.text_a[i : i + batch], examples.text_b[i : i + batch]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            enc = tok(a, b, padding=True, truncation=True, max_length=128, return_tensors="pt")
            o = model(**enc)
            ea = tok(a, padding=True, truncation=True, max_length=128, return_tensors="pt")
            eb = tok(b, padding=True, truncation=True, max_length=128, return_tensors="pt")
            ha, hb = model(**ea).last_hidden_state.float(), model(**eb).last_hidden_state.float()
        h = o.last_hidden_state.float()
        out["cls"].append(h[:, 0])
        out["pooler"].append(o.pooler_output.float())
        out["mean"].append(mean_pool(h, enc["attention_mask"]))
        u = F.normalize(mean_pool(ha, ea["attention_mask"]), dim=-1)
        v = F.normalize(mean_pool(hb, eb["attention_mask"]), dim=-1)
        out["sentence-pair"].append(torch.cat([(u - v).abs(), u * v, (u * v).sum(-1, keepdim=True)], -1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("minilm")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    task = load_task("mrpc")
    tr, dv = features(model, tok, task.train), features(model, tok, task.dev)
    ytr, ydv = np.array(task.train.labels), np.array(task.dev.labels)
    print(f"dev majority class {max(np.mean(ydv), 1 - np.mean(ydv)):.3f}")
    for name in tr:
        for c in (0.1, 1.0, 10.0):
            clf = LogisticRegression(C=c, max_iter=3000).fit(tr[name], ytr)
            print(f"{name:14s} C={c:<5} train {clf.score(tr[name], ytr):.3f} dev {clf.score(dv[name], ydv):.3f}")


if __name__ == "__main__":
    main()
