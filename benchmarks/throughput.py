"""Local training throughput: hlora's client loop against a bare PyTorch + PEFT loop, and the
accuracy-free speed-ups of training and evaluation, each measured with and without.

    python benchmarks/throughput.py [--examples 512] [--batch-size 16] [--threads 2] [--repeats 5]
                                    [--out FILE.json]

Same model (the bundled MiniLM-L6), same MRPC examples, batch size, rank (8, query and value, alpha 16),
optimizer (AdamW, lr 1e-3) and thread count. The bare loop is what a PEFT user writes: get_peft_model,
AdamW, batches padded to the batch's longest example. Arms, all interleaved: each repeat runs every arm
once, in an order rotated from one repeat to the next, so that the load of a shared machine hits all
arms alike. Reported: training examples per second per arm (median and range over the repeats), and the
ratio hlora / bare computed within each repeat (median and range).

Also measured (same interleaving): evaluation of the MRPC dev set (408 examples) under
``torch.inference_mode`` (hlora's) against ``torch.no_grad``, and in length-sorted order (hlora's)
against the given order; one thread against the other of 1 and 2 threads; and tokenizing the train set (what
tokenizing per round would cost each round, against once per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} [{min(xs):.1f}-{max(xs):.1f}]"


class BarePeft:
    """The loop a PEFT user writes; the model is built once, its adapter re-initialised per run."""

    def __init__(self, model_path: str) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
        self.model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                     task_type="SEQ_CLS"))
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def __call__(self, data, indices, batch_size, seed, grouped: bool) -> float:
        from hlora.client import length_grouped_batches

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.start:
                    p.copy_(self.start[n])
        t0 = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        torch.manual_seed(seed)
        self.model.train()
        batches = length_grouped_batches(indices, data.lengths, batch_size, torch.Generator().manual_seed(seed),
                                         32 if grouped else 0)
        for chunk in batches:
            loss = self.model(**data.batch(chunk)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return len(indices) / (time.perf_counter() - t0)


def hlora_loop(fm, data, indices, batch_size, seed, grouped: bool) -> float:
    import hlora.client as client
    from hlora.factors import init_factors
    from hlora.strategies import Payload

    lora = {m: f.with_scale(2.0) for m, f in init_factors(fm.shapes, 8, torch.Generator().manual_seed(0)).items()}
    payload = Payload(lora=lora, head=fm.head_state())
    t0 = time.perf_counter()  # everything a client costs: install, train, read out, clear
    client.train_client(fm, payload, data, indices, client_id=0, epochs=1, lr=1e-3, batch_size=batch_size,
                        seed=seed, group_by_length=grouped)
    return len(indices) / (time.perf_counter() - t0)


def eval_seconds(fm, data, batch_size, mode: str, sort: bool) -> float:
    """hlora.metrics.predict_logits, with the grad mode and the ordering as switches."""
    fm.install({}, fm.head_state())
    fm.model.eval()
    order = sorted(range(len(data)), key=data.lengths.__getitem__) if sort else list(range(len(data)))
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    t0 = time.perf_counter()
    try:
        with ctx():
            for start in range(0, len(order), batch_size):
                batch = data.batch(order[start:start + batch_size])
                batch.pop("labels")
                fm.model(**batch).logits.float()
    finally:
        fm.clear()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hlora.data import encode, load_task
    from hlora.model import FederatedModel, load_classifier, resolve_model_path

    task = load_task("mrpc")
    model, tok = load_classifier("minilm", 2, seed=0)
    fm = FederatedModel(model)
    t0 = time.perf_counter()
    data = encode(tok, task.train, 128)
    encode_train_s = time.perf_counter() - t0
    dev = encode(tok, task.dev, 128)
    g = torch.Generator().manual_seed(1)
    indices = torch.randperm(len(data), generator=g)[: args.examples].tolist()
    bare = BarePeft(resolve_model_path("minilm"))

    def threads(n, fn):
        def run(seed):
            torch.set_num_threads(n)
            try:
                return fn(seed)
            finally:
                torch.set_num_threads(args.threads)
        return run

    T = args.threads
    O = 2 if T == 1 else 1  # the other thread count, for the thread-setting arms
    train_arms = {
        "bare PEFT, random batches": lambda s: bare(data, indices, args.batch_size, s, False),
        "hlora, random batches": lambda s: hlora_loop(fm, data, indices, args.batch_size, s, False),
        "bare PEFT, length-grouped": lambda s: bare(data, indices, args.batch_size, s, True),
        "hlora, length-grouped (default)": lambda s: hlora_loop(fm, data, indices, args.batch_size, s, True),
    }
    train_arms[f"hlora, length-grouped, {O} threads"] = threads(
        O, lambda s: hlora_loop(fm, data, indices, args.batch_size, s, True))
    eval_arms = {
        "eval inference_mode, sorted (default)": lambda s: len(dev) / eval_seconds(fm, dev, 128, "inference_mode", True),
        "eval no_grad, sorted": lambda s: len(dev) / eval_seconds(fm, dev, 128, "no_grad", True),
        "eval inference_mode, unsorted": lambda s: len(dev) / eval_seconds(fm, dev, 128, "inference_mode", False),
    }
    eval_arms[f"eval inference_mode, sorted, {O} threads"] = threads(
        O, lambda s: len(dev) / eval_seconds(fm, dev, 128, "inference_mode", True))
    arms = {**train_arms, **eval_arms}
    # warm-up
    bare(data, indices[:64], args.batch_size, 0, True)
    hlora_loop(fm, data, indices[:64], args.batch_size, 0, True)
    eval_seconds(fm, dev, 128, "inference_mode", True)
    results: dict[str, list[float]] = {a: [] for a in arms}
    names = list(arms)
    for rep in range(args.repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(arms[name](rep))
        print(f"repeat {rep + 1}: " + ", ".join(f"{n} {results[n][-1]:.1f}" for n in names), flush=True)
    print(f"\ntorch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, "
          f"{args.examples} MRPC train examples per training arm, {args.repeats} interleaved repeats")
    for name in names:
        print(f"{name:40s} {med(results[name])} examples/s")

    def ratio(a, b):
        return [x / y for x, y in zip(results[a], results[b])]

    ratios = {
        "hlora / bare, random batches": ratio("hlora, random batches", "bare PEFT, random batches"),
        "hlora / bare, length-grouped": ratio("hlora, length-grouped (default)", "bare PEFT, length-grouped"),
        "length-grouped / random, hlora": ratio("hlora, length-grouped (default)", "hlora, random batches"),
        "length-grouped / random, bare": ratio("bare PEFT, length-grouped", "bare PEFT, random batches"),
        "inference_mode / no_grad, eval": ratio("eval inference_mode, sorted (default)", "eval no_grad, sorted"),
        "sorted / unsorted, eval": ratio("eval inference_mode, sorted (default)", "eval inference_mode, unsorted"),
    }
    ratios[f"{T} / {O} threads, hlora train"] = ratio("hlora, length-grouped (default)",
                                                     f"hlora, length-grouped, {O} threads")
    ratios[f"{T} / {O} threads, eval"] = ratio("eval inference_mode, sorted (default)",
                                               f"eval inference_mode, sorted, {O} threads")
    for name, r in ratios.items():
        print(f"{name:40s} {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
    print(f"tokenizing the MRPC train set ({len(data)} examples): {encode_train_s:.2f} s once per run "
          f"(per round it would cost that every round)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"threads": args.threads, "batch_size": args.batch_size, "examples": args.examples,
                       "repeats": args.repeats, "torch": torch.__version__, "examples_per_second": results,
                       "ratios": ratios, "encode_train_seconds": encode_train_s, "train_size": len(data)},
                      fh, indent=2)


if __name__ == "__main__":
    main()
