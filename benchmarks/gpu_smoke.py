"""Quick CUDA check: grouped_mm expert path vs the per-expert fallback (bf16), forward and backward."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m6lit.model.moe import GroupedExperts  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
for E, D, F, N in [(8, 64, 128, 512), (16, 128, 256, 40)]:
    ex = GroupedExperts(E, D, F).to(dev, torch.bfloat16)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.05)
    counts = torch.randint(0, 3 * N // E, (E,), device=dev)
    counts[1] = 0
    counts[-1] = 0
    x = torch.randn(int(counts.sum()), D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    y1 = ex._grouped(x, counts, torch.bfloat16)
    y1.backward(g)
    g1 = [x.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    x.grad = None
    for p in ex.parameters():
        p.grad = None
    y2 = ex._looped(x, counts, torch.bfloat16)
    y2.backward(g)
    g2 = [x.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
    print(E, D, F, "fwd rel", rel(y1, y2), "grads rel", [round(rel(a, b), 5) for a, b in zip(g1, g2)],
          "empty grads zero", all(float(p.grad[[1, -1]].abs().max()) == 0 for p in ex.parameters()))
