"""How much of its residual one edit writes, per layer, for a range of lambda.

With A = lambda * C0, a single edit with key k writes the share a / (1 + a) of its residual,
a = k^T C0^-1 k / lambda. This reads the keys of cached z* records (``editserve eval
--record-cache DIR``) and the default covariance, and prints the median of k^T C0^-1 k per
layer and the implied share for several lambda, next to the same for average (corpus) keys,
whose expectation is the trace of C0^-1 C0 = d_in.

Usage: python bench/key_stats.py RECORD_DIR [LAYERS]    e.g. .cache/records 3-7
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from editing.covariance import covariance
from editing.hparams import parse_layers
from editing.models import default_cache_dir, load_model
from editing.records import DeltaRecord


def main() -> None:
    folder = Path(sys.argv[1])
    layers = list(parse_layers(sys.argv[2] if len(sys.argv) > 2 else "3-7"))
    lm = load_model()
    c0 = covariance(lm, layers, cache_dir=default_cache_dir(), progress=False)
    records = [DeltaRecord.from_bytes(p.read_bytes()) for p in folder.rglob("*.safetensors")]
    records = [r for r in records if r.layers == tuple(layers)]
    print(f"{len(records)} records with layers {layers}")
    print("| layer | median k^T C0^-1 k | share at lambda 1500 | 3000 | 6000 | 15000 |")
    print("|---|---|---|---|---|---|")
    for layer in layers:
        keys = torch.cat([r.keys[layer] for r in records]).double()
        mahal = (keys * torch.linalg.solve(c0[layer], keys.T).T).sum(dim=1)
        med = statistics.median(mahal.tolist())
        shares = " | ".join(
            f"{(med / lam) / (1 + med / lam):.2f}" for lam in (1500, 3000, 6000, 15000)
        )
        print(f"| {layer} | {med:.0f} | {shares} |")


if __name__ == "__main__":
    main()
