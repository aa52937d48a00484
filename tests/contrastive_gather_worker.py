"""One process of the gathered-negatives test (tests/test_contrastive.py): its slice of a fixed batch, the loss with
negatives gathered over the group, gradients averaged as DDP does. Loads losses.py alone (it needs only torch), so
that a spawned process does not import all of vlmtune."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

LOSSES = Path(__file__).resolve().parents[1] / "vlmtune" / "contrastive" / "losses.py"


def losses():
    spec = importlib.util.spec_from_file_location("contrastive_losses", LOSSES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(n=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(torch.randn(n, dim, generator=g), dim=-1))


def leaves():
    images, texts = (x.clone().requires_grad_(True) for x in batch())
    return images, texts, torch.tensor(1.2, requires_grad=True), torch.tensor(-2.0, requires_grad=True)


def grads(*tensors):
    return [torch.zeros_like(t).reshape(-1) if t.grad is None else t.grad.reshape(t.shape or 1) for t in tensors]


def run(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    contrastive_loss = losses().contrastive_loss
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for kind in ("infonce", "sigmoid"):
            images, texts, scale, bias = leaves()
            n = len(images) // world
            mine = slice(rank * n, (rank + 1) * n)
            loss = contrastive_loss(kind, images[mine], texts[mine], scale, bias)
            loss.backward()
            gs = grads(images, texts, scale, bias)
            for g in gs:  # DDP averages gradients over processes
                dist.all_reduce(g)
                g /= world
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[kind] = {"loss": float(total / world), "grads": [g.tolist() for g in gs]}
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's C++ teardown: after this worker's gloo group is gone, torch 2.14 aborts now and then at
    # exit ("terminate called without an active exception", no Python frame; 3 in 12 runs here), which spawn
    # reports as a failed process though the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
