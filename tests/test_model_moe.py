"""MoELayer / Router / GroupedExperts against a naive per-token fp64 reference; aux losses; capacity; padding."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from m6lit.model import GroupedExperts, MoELayer, Router
from m6lit.model.moe import expert_capacity

D, FF = 8, 12


def _layer(num_experts: int, top_k: int, router: str = "topk", capacity_factor=None, norm_topk: bool = True,
           seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, FF, num_experts, top_k, router=router, capacity_factor=capacity_factor,
                     norm_topk=norm_topk, init_std=0.5, out_init_std=0.5)
    layer.router.logit_offset.normal_(std=0.3)  # the offset must take part in the logits
    return layer.double()


def _swiglu(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return ex.w_down[e] @ (F.silu(ex.w_gate[e] @ x) * (ex.w_up[e] @ x))


def reference_moe(layer: MoELayer, x: torch.Tensor, valid: torch.Tensor | None = None):
    """Naive per-token reference. Returns (y [N, D], routed counts [E], kept counts [E], dropped slots)."""
    n, _ = x.shape
    num_experts, k = layer.num_experts, layer.top_k
    w_r, offset = layer.router.weight, layer.router.logit_offset
    valid = [True] * n if valid is None else [bool(v) for v in valid]
    choices: list[list[tuple[int, torch.Tensor]]] = []
    for t in range(n):
        logits = x[t].double() @ w_r.double().t() + offset.double()
        picked: list[tuple[int, torch.Tensor]] = []
        if layer.router.kind == "topk":
            p = torch.softmax(logits, dim=0)
            order = sorted(range(num_experts), key=lambda e: -p[e].item())[:k]
            gates = [p[e] for e in order]
            if layer.router.norm_topk:
                total = sum(gates)
                gates = [g / total for g in gates]
            picked = list(zip(order, gates))
        else:
            size = num_experts // k
            for j in range(k):
                pj = torch.softmax(logits[j * size:(j + 1) * size], dim=0)
                a = max(range(size), key=lambda i: pj[i].item())
                picked.append((j * size + a, pj[a]))
        choices.append(picked)

    keep = [[valid[t]] * k for t in range(n)]
    routed = [0] * num_experts
    for t in range(n):
        if valid[t]:
            for e, _ in choices[t]:
                routed[e] += 1
    if layer.capacity_factor is not None:
        n_valid = sum(valid)
        cap = math.ceil(layer.capacity_factor * n_valid * k / num_experts)
        used = [0] * num_experts
        for j in range(k):  # first choices of all tokens (token order), then second choices, ...
            for t in range(n):
                if not valid[t]:
                    continue
                e = choices[t][j][0]
                keep[t][j] = used[e] < cap
                used[e] += keep[t][j]
    kept = [0] * num_experts
    rows = []
    for t in range(n):
        out = torch.zeros_like(x[t])
        for j, (e, g) in enumerate(choices[t]):
            if keep[t][j]:
                kept[e] += 1
                out = out + g * _swiglu(layer, e, x[t])
        rows.append(out)
    dropped = sum(routed) - sum(kept)
    return torch.stack(rows), torch.tensor(routed), torch.tensor(kept), dropped


def _params(layer: MoELayer) -> list[torch.Tensor]:
    ex = layer.experts
    return [layer.router.weight, ex.w_gate, ex.w_up, ex.w_down]


CASES = [
    # (num_experts, top_k, router, norm_topk, capacity_factor)
    (4, 1, "topk", True, None),
    (4, 2, "topk", True, None),
    (5, 2, "topk", False, None),
    (6, 3, "topk", True, None),
    (6, 2, "prototype", True, None),
    (6, 3, "prototype", True, None),
    (4, 1, "prototype", True, None),
    (4, 2, "topk", True, 1.0),
    (4, 2, "topk", False, 0.5),
    (4, 1, "topk", True, 0.75),
    (6, 2, "prototype", True, 1.0),
    (4, 2, "prototype", True, 0.5),
]


@pytest.mark.parametrize("num_experts,top_k,router,norm_topk,cf", CASES)
def test_moe_matches_naive_reference_forward_and_backward(num_experts, top_k, router, norm_topk, cf) -> None:
    layer = _layer(num_experts, top_k, router, cf, norm_topk)
    torch.manual_seed(1)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    weight = torch.randn(2, 7, D, dtype=torch.float64)

    x1 = x.clone().requires_grad_(True)
    y, aux = layer(x1)
    (y * weight).sum().backward()
    got = [x1.grad] + [p.grad.clone() for p in _params(layer)]
    layer.zero_grad()

    x2 = x.clone().requires_grad_(True)
    y_ref, routed, kept, dropped = reference_moe(layer, x2.view(-1, D))
    (y_ref.view_as(x) * weight).sum().backward()
    want = [x2.grad] + [p.grad.clone() for p in _params(layer)]

    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, y_ref.view_as(x), rtol=1e-10, atol=1e-12)
    for name, g, w in zip(["x", "router", "w_gate", "w_up", "w_down"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    assert torch.equal(aux.expert_counts, kept)
    assert int(aux.expert_counts.sum()) == 14 * top_k - dropped
    assert aux.dropped_fraction.item() == pytest.approx(dropped / (14 * top_k), rel=1e-6)  # an fp32 statistic
    if cf is None:
        assert dropped == 0 and aux.dropped_fraction.item() == 0.0
    elif cf <= 0.75:
        assert dropped > 0  # the capacity cases must actually drop something


def test_capacity_priority_first_choices_before_second_choices_hand_count() -> None:
    """Tokens 0-3 route (0, 1), tokens 4-7 route (1, 0); C = ceil(0.75 * 8 * 2 / 3) = 4. First choices win: expert
    0 keeps tokens 0-3's first choice and drops tokens 4-7's second; expert 1 the other way round. Token-order
    priority would instead keep both slots of tokens 0-1."""
    layer = _layer(3, 2, "topk", capacity_factor=0.75)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([1.0, -1.0, 0.0])
        layer.router.logit_offset.copy_(torch.tensor([0.0, 0.0, -10.0]))
    x = torch.randn(8, D, dtype=torch.float64)
    x[:4, 0] = 1.0
    x[4:, 0] = -1.0
    y, aux = layer(x)
    assert int(expert_capacity(0.75, torch.tensor(8), 2, 3)) == 4
    assert aux.expert_counts.tolist() == [4, 4, 0]
    assert aux.dropped_fraction.item() == pytest.approx(0.5)
    _, _, ids, gates = layer.router(x)
    assert ids[:4].tolist() == [[0, 1]] * 4 and ids[4:].tolist() == [[1, 0]] * 4
    # each token keeps only its first choice, gated by its renormalised gate
    want = torch.stack([gates[t, 0] * _swiglu(layer, int(ids[t, 0]), x[t]) for t in range(8)])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    y_ref, _, kept, dropped = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert kept.tolist() == [4, 4, 0] and dropped == 8


def test_capacity_token_order_within_a_choice_and_dropped_rows_are_zero() -> None:
    """Every token picks expert 0 (k=1, E=2, cf=1): C = 4 of 8, the first four tokens in token order are kept."""
    layer = _layer(2, 1, "topk", capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.logit_offset.copy_(torch.tensor([5.0, 0.0]))
    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert aux.expert_counts.tolist() == [4, 0]
    assert aux.dropped_fraction.item() == pytest.approx(0.5)
    assert bool((y[:4].abs().sum(-1) > 0).all())
    assert torch.equal(y[4:], torch.zeros_like(y[4:]))
    y.sum().backward()
    assert torch.equal(x.grad[4:], torch.zeros_like(x.grad[4:]))  # dropped slots pass no gradient
    assert float(x.grad[:4].abs().sum()) > 0


def test_expert_capacity_is_the_exact_ceiling_for_non_dyadic_factors() -> None:
    for cf, n, k, e in [(1.5, 25, 2, 5), (1.2, 25, 1, 2)]:
        want = math.ceil(round(cf * n * k / e, 9))
        assert int(expert_capacity(cf, torch.tensor(n), k, e)) == want, (cf, n, k, e)


def test_expert_capacity_formula_on_exact_values() -> None:
    for cf, n, k, e, want in [(1.0, 8, 1, 2, 4), (1.25, 10, 2, 4, 7), (0.5, 7, 2, 4, 2), (2.0, 3, 1, 8, 1)]:
        assert int(expert_capacity(cf, torch.tensor(n), k, e)) == want


def test_expert_with_zero_tokens_has_exactly_zero_weight_grads() -> None:
    layer = _layer(5, 2, "topk")
    with torch.no_grad():
        layer.router.logit_offset[3] = -1e4  # never chosen
    x = torch.randn(3, 6, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert int(aux.expert_counts[3]) == 0 and int(aux.expert_counts.sum()) == 36
    (y * torch.randn_like(y)).sum().backward()
    ex = layer.experts
    for w in (ex.w_gate, ex.w_up, ex.w_down):
        assert torch.equal(w.grad[3], torch.zeros_like(w.grad[3]))
        others = torch.cat([w.grad[:3], w.grad[4:]])
        assert bool((others.abs().flatten(1).sum(-1) > 0).all())  # every used expert learns
    assert torch.isfinite(x.grad).all()
    y_ref, _, _, _ = reference_moe(layer, x.detach().view(-1, D))
    torch.testing.assert_close(y.detach().view(-1, D), y_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("counts", [[0, 3, 0, 5], [4, 0, 0, 0], [0, 0, 0, 2], [1, 1, 1, 1]])
def test_grouped_experts_fallback_matches_per_row_swiglu_with_empty_groups(counts) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(4, D, FF).double()
    for w in ex.parameters():
        torch.nn.init.normal_(w, std=0.5)
    m = sum(counts)
    x = torch.randn(m, D, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(m, dtype=torch.float64)
    out = ex(x, torch.tensor(counts), scale)
    owner = [e for e, c in enumerate(counts) for _ in range(c)]
    want = torch.stack([scale[r] * (ex.w_down[e] @ (F.silu(ex.w_gate[e] @ x[r]) * (ex.w_up[e] @ x[r])))
                        for r, e in enumerate(owner)])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    for e, c in enumerate(counts):
        for w in (ex.w_gate, ex.w_up, ex.w_down):
            assert (float(w.grad[e].abs().sum()) == 0.0) == (c == 0)


# ---------------------------------------------------------------------------------------------- aux losses
def _forced_router_layer(num_experts: int, top_k: int, router: str, scale: float = 4.0) -> MoELayer:
    """Router weight = scale * I on the first E input dims, zero offset, so token logits are chosen by hand."""
    layer = _layer(num_experts, top_k, router)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :num_experts] = scale * torch.eye(num_experts, dtype=torch.float64)
        layer.router.logit_offset.zero_()
    return layer


def _tokens(patterns: list[list[float]], repeat: int = 3) -> torch.Tensor:
    x = torch.zeros(len(patterns) * repeat, D, dtype=torch.float64)
    for i in range(repeat):
        for j, pat in enumerate(patterns):
            x[i * len(patterns) + j, :len(pat)] = torch.tensor(pat, dtype=torch.float64)
    return x


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_is_one_for_perfectly_uniform_topk_routing(top_k) -> None:
    e = 4
    layer = _forced_router_layer(e, top_k, "topk")
    # token type i prefers expert i (and i+1 second, half as strongly): cyclic, so f and P are both uniform
    patterns = [[1.0 if j == i else (0.5 if j == (i + 1) % e else 0.0) for j in range(e)] for i in range(e)]
    _, aux = layer(_tokens(patterns))
    assert aux.expert_counts.tolist() == [3 * top_k] * e
    assert aux.balance_loss.item() == pytest.approx(1.0, abs=1e-12)


def test_balance_loss_is_one_for_perfectly_uniform_prototype_routing() -> None:
    layer = _forced_router_layer(4, 2, "prototype")  # groups {0, 1} and {2, 3}
    _, aux = layer(_tokens([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0],
                            [0.0, 1.0, 1.0, 0.0]]))
    assert aux.expert_counts.tolist() == [6, 6, 6, 6]
    assert aux.balance_loss.item() == pytest.approx(1.0, abs=1e-12)


def test_balance_loss_grows_under_collapse_with_the_switch_formula() -> None:
    e = 4
    layer = _forced_router_layer(e, 1, "topk")
    x = _tokens([[1.0, 0.0, 0.0, 0.0]], repeat=5)  # everyone → expert 0
    _, aux = layer(x)
    q = math.exp(4.0) / (math.exp(4.0) + 3)
    assert aux.expert_counts.tolist() == [5, 0, 0, 0]
    assert aux.balance_loss.item() == pytest.approx(e * q, rel=1e-12)  # E * f_0 * P_0 with f_0 = 1
    proto = _forced_router_layer(4, 2, "prototype")
    _, aux = proto(_tokens([[1.0, 0.0, 1.0, 0.0]], repeat=5))
    q2 = math.exp(4.0) / (math.exp(4.0) + 1)
    assert aux.balance_loss.item() == pytest.approx(2 * q2, rel=1e-12)  # per group: (E/k) * 1 * q, mean over k


@pytest.mark.parametrize("router,top_k,num_experts", [("topk", 2, 5), ("topk", 1, 4), ("prototype", 2, 6)])
def test_balance_z_loss_and_entropy_formulas_on_random_routing(router, top_k, num_experts) -> None:
    layer = _layer(num_experts, top_k, router)
    x = torch.randn(15, D, dtype=torch.float64)
    _, aux = layer(x)
    with torch.no_grad():
        logits = x @ layer.router.weight.t() + layer.router.logit_offset
    # z-loss: mean over tokens of logsumexp(logits)^2
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert aux.z_loss.item() == pytest.approx(float(z), rel=1e-12)
    _, routed, _, _ = reference_moe(layer, x)
    if router == "topk":
        p = logits.softmax(-1)
        f = routed.double() / (15 * top_k)
        balance = num_experts * (f * p.mean(0)).sum()
        entropy = -(p * p.log()).sum(-1).mean()
    else:
        size = num_experts // top_k
        p = logits.view(15, top_k, size).softmax(-1)
        f = routed.double().view(top_k, size) / 15
        balance = (size * (f * p.mean(0)).sum(-1)).mean()
        entropy = -(p * p.log()).sum(-1).mean()
    # the share f_e is an fp32 statistic, so the fp64 balance loss is exact to fp32 precision only
    assert aux.balance_loss.item() == pytest.approx(float(balance), rel=1e-6)
    assert aux.router_entropy.item() == pytest.approx(float(entropy), rel=1e-12)
    assert aux.balance_loss.item() > 0 and aux.z_loss.item() > 0


def test_balance_loss_gradient_flows_through_mean_probabilities_only() -> None:
    layer = _layer(4, 2, "topk")
    x = torch.randn(10, D, dtype=torch.float64)
    _, aux = layer(x)
    aux.balance_loss.backward()
    got = layer.router.weight.grad.clone()
    layer.zero_grad()
    f = aux.expert_counts.double() / 20  # constants
    p = (x @ layer.router.weight.t() + layer.router.logit_offset).softmax(-1)
    (4 * (f * p.mean(0)).sum()).backward()
    torch.testing.assert_close(got, layer.router.weight.grad, rtol=1e-6, atol=1e-12)  # f is fp32
    assert layer.experts.w_gate.grad is None or float(layer.experts.w_gate.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("router,top_k,cf", [("topk", 2, None), ("prototype", 2, None), ("topk", 2, 0.75),
                                             ("topk", 1, 1.0)])
def test_padding_tokens_are_excluded_from_counts_losses_and_capacity(router, top_k, cf) -> None:
    layer = _layer(4, top_k, router, capacity_factor=cf)
    torch.manual_seed(3)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    y, aux = layer(x, mask)
    y_valid, aux_valid = layer(x[mask].unsqueeze(0))
    torch.testing.assert_close(y[mask], y_valid[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(aux.expert_counts, aux_valid.expert_counts)
    if cf is None:
        assert int(aux.expert_counts.sum()) == 9 * top_k
    for name in ("balance_loss", "z_loss", "dropped_fraction", "router_entropy"):
        assert getattr(aux, name).item() == pytest.approx(getattr(aux_valid, name).item(), rel=1e-12, abs=1e-15)
    # and the padding really differs: unmasked statistics include it
    _, aux_all = layer(x)
    assert int(aux_all.expert_counts.sum()) > int(aux.expert_counts.sum())
    assert aux_all.z_loss.item() != pytest.approx(aux.z_loss.item(), rel=1e-9)


def test_dropless_counts_sum_to_tokens_times_k_and_match_router_ids() -> None:
    layer = _layer(6, 3, "topk")
    x = torch.randn(4, 5, D, dtype=torch.float64)
    _, aux = layer(x)
    _, _, ids, gates = layer.router(x.view(-1, D))
    assert aux.expert_counts.dtype == torch.long
    assert int(aux.expert_counts.sum()) == 20 * 3
    assert torch.equal(aux.expert_counts, torch.bincount(ids.flatten(), minlength=6))
    torch.testing.assert_close(gates.sum(-1), torch.ones(20, dtype=torch.float64))


def test_router_prototype_picks_one_expert_per_group_and_raw_gates() -> None:
    router = Router(D, 6, 3, "prototype").double()
    torch.nn.init.normal_(router.weight)
    x = torch.randn(9, D, dtype=torch.float64)
    logits, probs, ids, gates = router(x)
    assert probs.shape == (9, 3, 2)
    assert torch.equal(ids // 2, torch.arange(3).expand(9, 3))
    group_probs = logits.view(9, 3, 2).softmax(-1)
    torch.testing.assert_close(gates, group_probs.max(-1).values)
    assert bool((gates.sum(-1) > 1.0).all())  # raw group probabilities: each ≥ 1/2, not renormalised


def test_router_computes_logits_in_fp32_for_low_precision_inputs() -> None:
    router = Router(D, 4, 2)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, D).bfloat16()
    logits, probs, _, gates = router(x)
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ router.weight.t())


def test_moe_forward_and_backward_are_deterministic() -> None:
    layer = _layer(4, 2, "topk")
    x = torch.randn(3, 5, D, dtype=torch.float64)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, layer.experts.w_up.grad.clone()))
        layer.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_moe_under_cpu_bf16_autocast_is_close_to_fp32() -> None:
    layer = _layer(4, 2, "topk").float()
    x = torch.randn(2, 6, D)
    y32, aux32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux16 = layer(x)
    assert y16.dtype == torch.float32
    assert torch.equal(aux16.expert_counts, aux32.expert_counts)  # router stays fp32
    assert ((y16 - y32).norm() / y32.norm()).item() < 2e-2


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=4, top_k=5), "MoELayer: top_k=5 must be <= num_experts=4"),
    (dict(num_experts=4, top_k=0), "MoELayer: top_k=0 must be a positive integer"),
    (dict(num_experts=4, top_k=2, capacity_factor=0.0), "MoELayer capacity_factor=0.0: must be > 0 or None"),
    (dict(num_experts=5, top_k=2, router="prototype"),
     "MoELayer: router 'prototype' needs num_experts=5 divisible by top_k=2"),
    (dict(num_experts=4, top_k=2, router="expert_choice"), "MoELayer router='expert_choice': must be 'topk' or"),
    (dict(num_experts=4, top_k=2, segments=4), "MoELayer: segments=4 must divide top_k=2 and num_experts=4"),
])
def test_moe_layer_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        MoELayer(D, FF, **kwargs)


# ---------------------------------------------------------------------------------------------- self-initialisation
def test_bare_modules_hold_their_documented_initialisation() -> None:
    torch.manual_seed(3)
    layer = MoELayer(D, FF, 4, 2, init_std=0.5, out_init_std=0.25)
    torch.manual_seed(3)  # the same draws by hand, in the documented order: router, w_gate, w_up, w_down
    want = [torch.empty(4, D).normal_(std=0.5), torch.empty(4, FF, D).normal_(std=0.5),
            torch.empty(4, FF, D).normal_(std=0.5), torch.empty(4, D, FF).normal_(std=0.25)]
    got = [layer.router.weight, layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(layer.router.logit_offset, torch.zeros(4))
    torch.manual_seed(3)
    router = Router(D, 4, 2, init_std=0.5)
    experts = GroupedExperts(4, D, FF, init_std=0.5, out_init_std=0.25)
    assert torch.equal(router.weight, want[0]) and torch.equal(experts.w_down, want[3])
    assert GroupedExperts(2, D, FF, init_std=0.1).out_init_std == 0.1  # output std defaults to init_std


@pytest.mark.parametrize("cls,args", [(MoELayer, (D, FF, 4, 2)), (Router, (D, 4, 2)), (GroupedExperts, (4, D, FF))])
def test_meta_device_then_to_empty_and_reset_parameters_equals_eager_construction(cls, args) -> None:
    rng = torch.get_rng_state()
    with torch.device("meta"):
        meta = cls(*args)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn on the meta device
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    torch.manual_seed(4)
    meta.reset_parameters()
    torch.manual_seed(4)
    eager = cls(*args)
    for (name, a), b in zip([*meta.named_parameters(), *meta.named_buffers()],
                            [*eager.parameters(), *eager.buffers()]):
        assert torch.equal(a, b), name
    assert cls(*args, device="meta", dtype=torch.bfloat16).state_dict().keys() == eager.state_dict().keys()


def test_bare_moe_layer_runs_and_matches_the_reference() -> None:
    torch.manual_seed(0)
    layer = MoELayer(D, FF, 4, 2).double()
    x = torch.randn(6, D, dtype=torch.float64)
    y, _ = layer(x)
    y_ref, _, _, _ = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert layer.router.weight.std().item() == pytest.approx(0.02, rel=0.3)  # initialised, not uninitialised memory
