"""Irregularly sampled JapaneseVowels: S4D, CfC and ODE-RNN side by side.

JapaneseVowels (Kudo, Toyama & Shimbo 1999; shipped with aeon, no download): 9 speakers, 12 LPC
cepstrum coefficients per frame, 7 to 29 frames; 270 training and 370 test series. Here a
fraction of each series' frames (default 30%) is dropped at random (the same frames for every
model), so every series has its own irregular observation times.

Each model reads the surviving frames with their times:

* ``S4D``: two S4D blocks in irregular-time mode (``dt`` = frames elapsed since the previous
  kept frame: the exact zero-order-hold discretisation per sample and step), masked mean
  pooling. ``S4D (dt ignored)`` is the same model told that the kept frames are consecutive; it
  (and S4D with no frame dropped) runs in convolution mode.
* ``CfC``: the gated closed-form cell with the elapsed time per step.
* ``ODE-RNN``: a neural ODE between observations (per-sample solves), a GRU update at each.
* optional (``--models ...,s5,ltc``): ``S5`` (the S4D model with S5 layers, state 32 shared by the
  channels) and ``LTC`` (the liquid ODE solved between observations).

Padding after a series' last kept frame is masked (CfC, ODE-RNN) or has ``dt = 0`` and is
excluded from the pooling (S4D), so it changes nothing.

Run::

    python examples/irregular_vowels.py --epochs 30 --seed 0
"""

from __future__ import annotations

import argparse
import time

import torch
from japanese_vowels_cde import load  # the data as the neural CDE example reads them (same folder)
from torch import nn

from torchnde.nn import LTC, ODERNN, S4D, S5, CfC


def drop_and_pad(series, mean, std, drop: float, gen: torch.Generator, max_len: int):
    """Keep each frame with probability 1 - drop (at least 2 per series); returns padded
    ``x`` (n, max_len, 12), frame times ``ts`` (n, max_len; padding repeats the last time) and the
    ``mask`` of kept frames."""
    n = len(series)
    x = torch.zeros(n, max_len, series[0].shape[1])
    ts = torch.zeros(n, max_len)
    mask = torch.zeros(n, max_len, dtype=torch.bool)
    for i, s in enumerate(series):
        keep = torch.rand(s.shape[0], generator=gen) >= drop
        if keep.sum() < 2:
            keep[torch.randperm(s.shape[0], generator=gen)[:2]] = True
        idx = keep.nonzero().squeeze(-1)
        k = idx.numel()
        x[i, :k] = (s[idx] - mean) / std
        ts[i, :k] = idx.float()
        ts[i, k:] = idx[-1].float()
        mask[i, :k] = True
    return x, ts, mask


class S4DBlock(nn.Module):
    def __init__(self, width: int, state_size: int):
        super().__init__()
        self.ssm = S4D(width, state_size, init="legs", dt_min=0.01, dt_max=0.5)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, u, dt):
        return self.norm(u + self.mix(nn.functional.gelu(self.ssm(u, dt))))


class S5Block(S4DBlock):
    def __init__(self, width: int, state_size: int):
        super().__init__(width, state_size)
        self.ssm = S5(width, state_size, init="legs", dt_min=0.01, dt_max=0.5)


class S4DClassifier(nn.Module):
    def __init__(self, channels, width, classes, use_dt=True, state_size=16, block=S4DBlock):
        super().__init__()
        self.use_dt = use_dt
        self.encoder = nn.Linear(channels, width)
        self.blocks = nn.ModuleList([block(width, state_size) for _ in range(2)])
        self.readout = nn.Linear(width, classes)

    def forward(self, x, ts, mask):
        dt = torch.cat([torch.ones_like(ts[:, :1]), ts.diff(dim=1)], 1)
        regular = not self.use_dt or bool(((dt == 1) | ~mask).all())
        if regular and isinstance(self.blocks[0].ssm, S4D):
            # consecutive frames (or told so): the regular grid, by FFT convolution; the padding
            # comes after each series' frames, so (causal) it changes no output that is pooled
            dt = None
        else:  # padding: no time passes, nothing enters the state
            dt = (torch.ones_like(dt) if not self.use_dt else dt) * mask
        u = self.encoder(x) * mask[..., None]
        for block in self.blocks:
            u = block(u, dt)
        w = mask[..., None].to(u.dtype)
        return self.readout((u * w).sum(1) / w.sum(1))


class RecurrentClassifier(nn.Module):
    def __init__(self, cell, hidden, classes):
        super().__init__()
        self.cell = cell
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x, ts, mask):
        _, h = self.cell(x, ts=ts, mask=mask)
        return self.readout(h)


def train(model, data, args, gen):
    (x_tr, ts_tr, m_tr, y_tr), (x_te, ts_te, m_te, y_te) = data
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = loss_fn(model(x_tr[idx], ts_tr[idx], m_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = (model(x_te, ts_te, m_te).argmax(-1) == y_te).float().mean().item()
    return acc, wall


def make_data(drop: float, seed: int):
    """Training and test ``(x, ts, mask, y)``, normalised by the training frames' statistics, with
    the frames ``drop_and_pad`` keeps (the seed picks them); also the fraction of training frames
    kept."""
    train_s, y_train = load("train")
    test_s, y_test = load("test")
    allrows = torch.cat(train_s)
    mean, std = allrows.mean(0), allrows.std(0)
    max_len = max(s.shape[0] for s in train_s + test_s)
    gen = torch.Generator().manual_seed(seed)
    data = (
        (*drop_and_pad(train_s, mean, std, drop, gen, max_len), y_train),
        (*drop_and_pad(test_s, mean, std, drop, gen, max_len), y_test),
    )
    kept = (data[0][2].float().sum() / sum(s.shape[0] for s in train_s)).item()
    return data, kept


def model_builders(hidden: int, classes: int = 9) -> dict:
    """``{key: (name, build)}`` for every model of the example (``--models`` keys)."""
    H, C = hidden, classes
    return {
        "s4d": ("S4D", lambda: S4DClassifier(12, H, C, use_dt=True)),
        "s4d_nodt": ("S4D (dt ignored)", lambda: S4DClassifier(12, H, C, use_dt=False)),
        "cfc": ("CfC", lambda: RecurrentClassifier(CfC(12, H, backbone_units=64), H, C)),
        "odernn": ("ODE-RNN", lambda: RecurrentClassifier(ODERNN(12, H, width=64), H, C)),
        "s5": ("S5", lambda: S4DClassifier(12, H, C, state_size=H, block=S5Block)),
        "ltc": ("LTC", lambda: RecurrentClassifier(LTC(12, H), H, C)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--drop", type=float, default=0.3, help="fraction of frames dropped")
    parser.add_argument("--models", default="s4d,s4d_nodt,cfc,odernn")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data, kept = make_data(args.drop, args.seed)
    print(f"dropped {args.drop:.0%} of frames at random (kept {kept:.1%} of the training frames)")

    builders = model_builders(args.hidden)
    results = {}
    for key in args.models.split(","):
        name, build = builders[key]
        torch.manual_seed(args.seed)
        acc, wall = train(build(), data, args, torch.Generator().manual_seed(args.seed))
        results[name] = (acc, wall)
        print(f"{name:18s} test accuracy {acc:.4f}  training time {wall:.1f} s")
    return results


if __name__ == "__main__":
    main()
