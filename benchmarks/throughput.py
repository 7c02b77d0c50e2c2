"""Local training throughput: hlora's client loop against a bare PyTorch + PEFT loop.

    python benchmarks/throughput.py [--examples 512] [--batch-size 16] [--threads 2] [--repeats 2]

Same model (the bundled MiniLM-L6), same MRPC examples, batch size, rank (8, query and value, alpha 16)
and thread count. The bare loop is what a PEFT user writes: get_peft_model, AdamW, random batches padded
to the batch's longest example. hlora's loop is measured with random batches and with length-grouped
batches (its default). Reported: training examples per second (best of --repeats, after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def bare_peft(model_path, data, indices, batch_size, seed) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = data.batch([indices[i] for i in order[start:start + batch_size]])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return len(indices) / (time.perf_counter() - t0)


def hlora_loop(fm, data, indices, batch_size, seed, grouped: bool) -> float:
    import hlora.client as client
    from hlora.factors import init_factors
    from hlora.strategies import Payload

    lora = {m: f.with_scale(2.0) for m, f in init_factors(fm.shapes, 8, torch.Generator().manual_seed(seed)).items()}
    payload = Payload(lora=lora, head=fm.head_state())
    t0 = time.perf_counter()
    client.train_client(fm, payload, data, indices, client_id=0, epochs=1, lr=1e-3, batch_size=batch_size,
                        seed=seed, group_by_length=grouped)
    return len(indices) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hlora.data import encode, load_task
    from hlora.model import FederatedModel, load_classifier, resolve_model_path

    task = load_task("mrpc")
    model, tok = load_classifier("minilm", 2, seed=0)
    fm = FederatedModel(model)
    data = encode(tok, task.train, 128)
    indices = list(range(args.examples))
    path = resolve_model_path("minilm")
    bare_peft(path, data, indices[:64], args.batch_size, 0)  # warm-up
    hlora_loop(fm, data, indices[:64], args.batch_size, 0, True)
    results = {}
    for name, fn in [
        ("bare PEFT loop (random batches)", lambda s: bare_peft(path, data, indices, args.batch_size, s)),
        ("hlora client loop (random batches)", lambda s: hlora_loop(fm, data, indices, args.batch_size, s, False)),
        ("hlora client loop (length-grouped, default)", lambda s: hlora_loop(fm, data, indices, args.batch_size, s, True)),
    ]:
        results[name] = max(fn(s) for s in range(args.repeats))
        print(f"{name:45s} {results[name]:7.1f} examples/s", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"threads": args.threads, "batch_size": args.batch_size, "examples": args.examples,
                       "examples_per_second": results}, fh, indent=2)


if __name__ == "__main__":
    main()
