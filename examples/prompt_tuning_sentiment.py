"""Prompt-tune SmolLM2-135M-Instruct into a sentiment classifier, through a swarm.

A DHT node and ``--servers`` servers start on this machine (separate processes, QUIC over
loopback, as ``distllm demo`` does); the embedded default model is prepared on first use. A
:class:`distllm.DistributedModelForSequenceClassification` then trains only its client-side
parameters -- a 2-way ``score`` head and ``--pre-seq-len`` prompt vectors (plus per-block deep
prompts with ``--mode deep_ptune``) -- on a few dozen labelled sentences written below. The
transformer blocks stay frozen on the servers: every training step is a forward through the
swarm and a backward that the servers answer with the gradients of their inputs (and of the
deep prompts). Accuracy on a held-out split is printed before and after.

    python examples/prompt_tuning_sentiment.py --epochs 6 --pre-seq-len 8 --lr 0.01
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

POSITIVE = [
    "I loved this movie, the acting was wonderful.",
    "What a fantastic meal, I will come back soon.",
    "The service was friendly and quick.",
    "This book is a delight from start to finish.",
    "Absolutely brilliant performance by the whole cast.",
    "The hotel room was clean, bright and comfortable.",
    "Great value for money, highly recommended.",
    "My new phone works perfectly and the battery lasts for days.",
    "The concert was amazing and the crowd was happy.",
    "A heartwarming story with a beautiful ending.",
    "The staff went out of their way to help us.",
    "This is the best coffee I have had in years.",
    "The app is fast, simple and a joy to use.",
    "We had a wonderful time at the beach resort.",
    "The teacher explained everything clearly and patiently.",
    "Such a lovely garden, full of colour and life.",
    "The sequel is even better than the original.",
    "Delivery was early and the package was perfect.",
    "I am thrilled with the results, thank you!",
    "The soup was warm, tasty and generous.",
    "An inspiring talk that left me full of energy.",
    "Our guide was funny, kind and knowledgeable.",
    "The new update fixed every problem I had.",
    "I would happily watch this film again.",
    "The bakery smells wonderful and the bread is superb.",
    "Everything about the trip was a pleasure.",
    "The headphones sound crisp and feel comfortable.",
    "A charming little cafe with excellent cake.",
    "The game is fun, clever and beautifully made.",
    "I felt welcome from the moment I arrived.",
]
NEGATIVE = [
    "I hated this movie, the acting was terrible.",
    "What an awful meal, I will never come back.",
    "The service was rude and painfully slow.",
    "This book is boring from start to finish.",
    "A dreadful performance by the whole cast.",
    "The hotel room was dirty, dark and noisy.",
    "A waste of money, do not buy it.",
    "My new phone keeps crashing and the battery dies in hours.",
    "The concert was a disaster and the sound was awful.",
    "A depressing story with a pointless ending.",
    "The staff ignored us and were unhelpful.",
    "This is the worst coffee I have ever tasted.",
    "The app is slow, confusing and full of bugs.",
    "We had a miserable time at the beach resort.",
    "The teacher was impatient and explained nothing.",
    "A sad garden, full of weeds and rubbish.",
    "The sequel is even worse than the original.",
    "Delivery was late and the package was broken.",
    "I am disappointed with the results, what a mess.",
    "The soup was cold, bland and tiny.",
    "A dull talk that left me bored and tired.",
    "Our guide was rude, grumpy and clueless.",
    "The new update broke everything that worked.",
    "I regret wasting two hours on this film.",
    "The bakery smells stale and the bread is hard.",
    "Everything about the trip went wrong.",
    "The headphones sound tinny and hurt my ears.",
    "A gloomy little cafe with dry, tasteless cake.",
    "The game is tedious, buggy and ugly.",
    "I felt unwelcome from the moment I arrived.",
]
LABELS = ("negative", "positive")
TEMPLATE = "Review: {}\nSentiment:"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pre-seq-len", type=int, default=8, metavar="N")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (0.01)")
    parser.add_argument("--mode", choices=["ptune", "deep_ptune"], default="ptune")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--test-size", type=int, default=20, help="held-out sentences (20)")
    parser.add_argument("--servers", type=int, default=2, help="server processes (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server (1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)"
    )
    return parser.parse_args(argv)


def split(test_size: int, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Shuffled ``(sentence, label)`` pairs: a training and a held-out part, both balanced."""
    rng = random.Random(seed)
    pos = [(s, 1) for s in POSITIVE]
    neg = [(s, 0) for s in NEGATIVE]
    rng.shuffle(pos)
    rng.shuffle(neg)
    half = test_size // 2
    test = pos[:half] + neg[:half]
    train = pos[half:] + neg[half:]
    rng.shuffle(train)
    return train, test


def batches(data: list[tuple[str, int]], size: int) -> list[list[tuple[str, int]]]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def encode(tokenizer: Any, rows: list[tuple[str, int]]) -> tuple[Any, Any, Any]:
    import torch

    enc = tokenizer([TEMPLATE.format(s) for s, _ in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([label for _, label in rows])
    return enc.input_ids, enc.attention_mask, labels


def accuracy(model: Any, tokenizer: Any, data: list[tuple[str, int]], size: int) -> float:
    import torch

    model.eval()
    right = 0
    with torch.no_grad():
        for rows in batches(data, size):
            ids, mask, labels = encode(tokenizer, rows)
            predicted = model(ids, attention_mask=mask).logits.argmax(-1)
            right += int((predicted == labels).sum())
    return right / len(data)


def train(args: argparse.Namespace, model: Any, tokenizer: Any) -> None:
    import torch

    train_set, test_set = split(args.test_size, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    print(f"trainable: {', '.join(names)} ({count:,} values); the blocks stay on the servers")
    print(f"{len(train_set)} training sentences, {len(test_set)} held out")
    print(f"held-out accuracy before training: {accuracy(model, tokenizer, test_set, 16):.0%}")
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    rng = random.Random(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        rng.shuffle(train_set)
        began, total = time.monotonic(), 0.0
        for rows in batches(train_set, args.batch_size):
            ids, mask, labels = encode(tokenizer, rows)
            loss = model(ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()  # through the swarm: the servers return the input gradients
            optimizer.step()
            total += loss.item() * len(rows)
        took = time.monotonic() - began
        print(f"epoch {epoch}: loss {total / len(train_set):.4f} ({took:.1f} s)", flush=True)
    print(f"held-out accuracy after training:  {accuracy(model, tokenizer, test_set, 16):.0%}")
    sentence = "The film was a complete waste of time."
    ids, mask, _ = encode(tokenizer, [(sentence, 0)])
    with torch.no_grad():
        probs = model(ids, attention_mask=mask).logits.softmax(-1)[0]
    print(f"{sentence!r}: {LABELS[int(probs.argmax())]} (p={float(probs.max()):.2f})")


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from transformers import AutoTokenizer

    from distllm import DistributedModelForSequenceClassification
    from distllm.cli.loopback import COLOCATED_ENV, LoopbackSwarm, even_spans
    from distllm.model import load_config
    from distllm.model.resolve import DEFAULT_MODEL, resolve_model

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    resolved = resolve_model(args.model or DEFAULT_MODEL)  # converted once, on first use
    num_blocks = int(load_config(resolved.path).num_hidden_layers)
    spans = even_spans(num_blocks, args.servers)
    with (
        tempfile.TemporaryDirectory(prefix="distllm-ptune-") as tmp,
        LoopbackSwarm(Path(tmp), env=COLOCATED_ENV) as swarm,
    ):
        print(f"starting a DHT node and {len(spans)} servers of {resolved.name} ...", flush=True)
        swarm.start_dht()
        extra = ("--no-measure", "--num-threads", str(args.threads))
        for span in spans:
            swarm.add_server(resolved.path, span, name=resolved.name, extra=extra)
        swarm.wait_ready()
        print(f"swarm up: blocks {', '.join(f'{a}..{b - 1}' for a, b in spans)}", flush=True)
        with DistributedModelForSequenceClassification.from_pretrained(
            args.model or DEFAULT_MODEL,
            initial_peers=swarm.initial_peers,
            num_labels=2,
            tuning_mode=args.mode,
            pre_seq_len=args.pre_seq_len,
        ) as model:
            tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
            model.config.pad_token_id = tokenizer.pad_token_id
            train(args, model, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
