"""Early exits for a Hugging Face ViT: ``wrap(vit)``, train the new heads, calibrate, serve.

A small ``transformers.ViTForImageClassification`` (random initialisation, 6 layers) is first trained
on scikit-learn's bundled 8x8 digits, standing in for your fine-tuned ViT. Then:

1. ``wrap(vit)`` puts exits after layers 2, 4 and 6 (every few layers), with token heads
   (class token, LayerNorm, linear) on the early ones and the ViT's own final norm and classifier as
   the last exit;
2. ``fit_exits`` trains only the new heads, the ViT frozen;
3. EENet is calibrated for an average cost of 0.6 of the full model and runs for real.

Run: ``python examples/vit_digits.py`` (under a minute on 2 CPU cores; needs the ``examples`` extra).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from common import calibrate_and_run
from eenet_fast import fit_exits, wrap
from eenet_fast.datasets import load_digits_split


def main() -> dict[str, float]:
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    batches = {name: [(x[i : i + 90], y[i : i + 90]) for i in range(0, len(x), 90)] for name, (x, y) in data.items()}

    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    vit = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(vit.parameters(), lr=2e-3)
    start = time.perf_counter()
    vit.train()
    for _ in range(25):  # "your fine-tuned ViT"
        for x, y in batches["train"]:
            optimizer.zero_grad()
            F.cross_entropy(vit(x).logits, y).backward()
            optimizer.step()
    vit.eval()
    print(f"trained the ViT in {time.perf_counter() - start:.0f} s")

    model = wrap(vit, example_input=batches["val"][0][0])  # checks the last exit against vit(x).logits
    start = time.perf_counter()
    fit_exits(model, batches["train"], 15, lr=3e-3, progress=False, seed=0)
    print(f"trained the {len(model.new_heads)} new exit heads (ViT frozen) in {time.perf_counter() - start:.0f} s")
    return calibrate_and_run(model, lambda x: vit(x).logits, batches["val"], batches["test"])


if __name__ == "__main__":
    main()
