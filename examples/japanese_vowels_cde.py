"""A neural CDE classifier on JapaneseVowels (variable-length multivariate series).

JapaneseVowels (Kudo, Toyama & Shimbo 1999; shipped with aeon, no download): 9 speakers
uttering a vowel, 12 LPC cepstrum coefficients per frame, 7 to 29 frames per utterance; 270
training and 370 test series; the task is to name the speaker.

Each series becomes a path with :class:`~torchnde.paths.HermiteCubic` (C1, causal; Morrill et al.
2021) on the frame index, with time as an extra channel (Kidger et al. 2020). Shorter series are
padded by repeating their last frame (:func:`~torchnde.paths.pad_sequences`), so the path is
constant after a series ends and ``z(t1)`` is the state at its own end.

Run::

    python examples/japanese_vowels_cde.py --epochs 30 --seed 0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import torchnde as tn
from torchnde.nn import NeuralCDE
from torchnde.paths import HermiteCubic, pad_sequences


def load(split: str):
    from aeon.datasets import load_japanese_vowels

    X, y = load_japanese_vowels(split=split)
    series = [torch.as_tensor(np.asarray(x, dtype=np.float32).T) for x in X]  # (length, 12)
    labels = torch.as_tensor(np.asarray(y).astype(np.int64) - 1)
    return series, labels


def prepare(series, mean, std, max_len: int):
    """Normalised channels, plus time (frame index / max_len) as channel 0; padded to one grid."""
    seqs = []
    for s in series:
        t = torch.arange(s.shape[0], dtype=s.dtype).unsqueeze(-1) / max_len
        seqs.append(torch.cat([t, (s - mean) / std], -1))
    return pad_sequences(seqs)


class Field(nn.Module):
    """f(z): (..., hidden) -> (..., hidden, channels)."""

    def __init__(self, hidden: int, channels: int, width: int = 64):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.net = nn.Sequential(
            nn.Linear(hidden, width), nn.Softplus(), nn.Linear(width, hidden * channels), nn.Tanh()
        )

    def forward(self, t, z):
        return self.net(z).view(*z.shape, self.channels)


def build_model(channels: int, hidden: int, classes: int = 9) -> NeuralCDE:
    """The neural CDE classifier: z(t0) from the first frame, a path per series, logits from z(t1)."""
    return NeuralCDE(
        Field(hidden, channels),
        nn.Linear(channels, hidden),
        nn.Linear(hidden, classes),
        solver=tn.RK4(),
        dt0=1.0,  # one RK4 step per frame: the path is one cubic per frame
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    train, y_train = load("train")
    test, y_test = load("test")
    allrows = torch.cat(train)
    mean, std = allrows.mean(0), allrows.std(0)
    max_len = max(s.shape[0] for s in train + test)
    ts, x_all = prepare(train + test, mean, std, max_len)  # one grid 0 .. max_len - 1
    x_train, x_test = x_all[: len(train)], x_all[len(train) :]
    channels = x_train.shape[-1]

    model = build_model(channels, args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1))
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()

    def accuracy(x, y):
        model.eval()
        with torch.no_grad():
            logits = model(HermiteCubic(ts, x))
        model.train()
        return (logits.argmax(-1) == y).float().mean().item()

    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            logits = model(HermiteCubic(ts, x_train[idx]))
            loss = loss_fn(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(perm):.4f}  ({time.perf_counter() - start:.1f} s)")

    train_acc = accuracy(x_train, y_train)
    test_acc = accuracy(x_test, y_test)
    wall = time.perf_counter() - start
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}  wall time {wall:.1f} s")
    return test_acc, wall


if __name__ == "__main__":
    main()
