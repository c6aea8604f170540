"""The Matryoshka BatchTopK SAE: selection, decode, loss gradients, training behaviour, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from insight.config import REFERENCE_FRACTIONS, SAEConfig
from insight.sae import MatryoshkaSAE, load_sae, make_optimizer, matryoshka_loss, save_sae, train_step
from insight.sae.metrics import cosine, dead_fraction_per_group, fvu, fvu_per_prefix, group_l0, l0
from insight.sae.model import batch_topk, geometric_median, group_sizes_from_fractions
from insight.sae.objectives import dead_mask, update_dead_counter
from insight.sae.sparse import SparseCodes, dense_decode_groups, sparse_decode_groups
from insight.sae.step import calibrate_threshold, calibrate_threshold_heldout, load_checkpoint

D_TOY, ATOMS, ACTIVE = 32, 64, 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized ops: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(n: int, atoms_ad: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rows = sums of ACTIVE random atoms with positive coefficients in [0.5, 1.5)."""
    idx = torch.rand(n, atoms_ad.shape[0], generator=gen).argsort(1)[:, :ACTIVE]
    coef = torch.rand(n, ACTIVE, generator=gen) + 0.5
    z = torch.zeros(n, atoms_ad.shape[0]).scatter_(1, idx, coef)
    return z @ atoms_ad


def random_atoms(gen: torch.Generator) -> torch.Tensor:
    atoms = torch.randn(ATOMS, D_TOY, generator=gen)
    return atoms / atoms.norm(dim=1, keepdim=True)


def perturbed_sae(d: int = 16, m: int = 64, sizes: list[int] | None = None, k: int = 3) -> MatryoshkaSAE:
    """A float64 SAE away from its symmetric init, for exact gradient comparisons."""
    sae = MatryoshkaSAE(d, m, sizes or [8, 24, 32], k, seed=1, dtype=torch.float64, aux_k=5)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(m, generator=gen, dtype=torch.float64))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=gen, dtype=torch.float64))
        sae.W_enc.add_(0.1 * torch.randn(d, m, generator=gen, dtype=torch.float64))
    return sae


# ------------------------------------------------------------------ groups


def test_reference_group_sizes() -> None:
    assert group_sizes_from_fractions(8192, REFERENCE_FRACTIONS) == [65, 245, 491, 983, 1966, 4442]
    sae = MatryoshkaSAE.from_config(512, SAEConfig(), seed=0)
    assert sae.n_concepts == 8192
    assert sae.group_sizes == [65, 245, 491, 983, 1966, 4442]
    assert sae.prefix_ends == [65, 310, 801, 1784, 3750, 8192]
    assert sae.W_enc.shape == (512, 8192) and sae.W_dec.shape == (8192, 512)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7, 8])
def test_depth_only_rule_gives_depth_groups(depth: int) -> None:
    cfg = SAEConfig(depth=depth, expansion=16)
    sae = MatryoshkaSAE.from_config(64, cfg, seed=0)
    assert sae.n_groups == depth
    assert sum(sae.group_sizes) == 1024
    assert all(s >= 1 for s in sae.group_sizes)
    if depth == 6:
        assert sae.group_sizes == group_sizes_from_fractions(1024, REFERENCE_FRACTIONS)
    else:  # doubling groups
        assert all(b >= a for a, b in zip(sae.group_sizes, sae.group_sizes[1:], strict=False))


def test_bad_fractions_are_rejected() -> None:
    with pytest.raises(ValueError, match="too few"):
        group_sizes_from_fractions(10, [0.01, 0.99])
    with pytest.raises(ValueError, match="sum to 1"):
        group_sizes_from_fractions(100, [0.5, 0.6])


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("shape,k", [((64, 512), 5), ((33, 96), 7), ((16, 50), 3)])
def test_batch_topk_is_exact(shape: tuple[int, int], k: int) -> None:
    pre = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    idx, vals = batch_topk(pre, k * shape[0])
    ref = torch.topk(pre.flatten(), k * shape[0]).indices.sort().values
    assert torch.equal(idx, ref)
    assert torch.equal(vals, pre.flatten()[ref].clamp_min(0))


def test_batch_topk_keeps_exactly_kb_with_ties() -> None:
    pre = torch.randint(0, 4, (128, 256), generator=torch.Generator().manual_seed(0)).float()
    idx, _ = batch_topk(pre, 12 * 128)
    assert idx.numel() == 12 * 128 and idx.unique().numel() == 12 * 128


def test_encode_batchtopk_keeps_k_times_b() -> None:
    sae = MatryoshkaSAE(32, 256, [64, 192], k=4, seed=0)
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(0))
    codes = sae.encode_batchtopk(x)
    assert codes.nnz == 4 * 100
    z = codes.to_dense()
    assert int((z != 0).sum()) == 4 * 100  # all kept values are positive here
    # they are the largest ReLU'd pre-activations of the batch
    pre = sae.pre_acts(x).detach().relu()
    assert float(z[z > 0].min().detach()) >= float(pre[z == 0].max())
    # rows get different counts (batch, not per-row, top-k), the mean is k
    counts = (z != 0).sum(1)
    assert counts.float().mean() == 4 and counts.max() > counts.min()


def test_encode_grid_matches_encode() -> None:
    sae = MatryoshkaSAE(16, 64, [16, 48], k=3, seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    acts = torch.randn(2, 3, 5, 16)
    maps = sae.encode_grid(acts, max_rows=7)
    assert maps.shape == (2, 3, 5, 64)
    assert torch.allclose(maps.reshape(-1, 64), sae.encode(acts.reshape(-1, 16)), atol=1e-6)
    assert torch.equal(sae.encode_grid(acts, max_rows=4), maps)  # blocks written straight into the result


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_encode_equals_the_formula(dtype: torch.dtype) -> None:
    """encode (folded bias, in-place threshold) and encode_sparse (blocked, never dense) give
    relu((x - b_dec) W_enc + b_enc) * 1[. > theta], the straightforward formula."""
    sae = perturbed_sae(d=16, m=64).to(dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 16, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        want = pre * (pre > sae.threshold)
        z = sae.encode(x)
        codes = sae.encode_sparse(x, block_rows=7)  # blocks that do not divide the batch
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    clear = (pre - 0.3).abs() > tol  # entries whose side of theta rounding cannot flip
    assert int(clear.sum()) > 0.9 * pre.numel() and int((want[clear] > 0).sum()) > 50
    assert torch.equal((z != 0)[clear], (want != 0)[clear])
    assert torch.allclose(z, want, atol=tol, rtol=0)
    assert codes.batch_size == 50 and codes.n_concepts == 64
    assert torch.equal(codes.to_dense() != 0, z != 0)  # same support as encode
    assert torch.allclose(codes.to_dense(), z, atol=tol, rtol=0)
    flat = codes.batch_idx * 64 + codes.concept_idx
    assert bool((flat[1:] > flat[:-1]).all())  # sorted by (row, concept), like training codes
    assert sae.encode_sparse(x[:0]).nnz == 0


# ---------------------------------------------------------------- decode


def test_prefix_reconstructions_add_up() -> None:
    sae = perturbed_sae()
    x = torch.randn(40, 16, dtype=torch.float64)
    with torch.no_grad():
        codes = sae.encode_batchtopk(x)
        prefixes = sae.decode_prefixes(codes)
        z = codes.to_dense()
        for g, end in enumerate(sae.prefix_ends):
            ref = sae.b_dec + z[:, :end] @ sae.W_dec[:end]
            assert torch.allclose(prefixes[g], ref, atol=1e-12)
        assert torch.allclose(prefixes[-1], sae.decode(codes), atol=1e-12)
        assert torch.allclose(prefixes[-1], sae.decode(z), atol=1e-12)


def _random_codes(b: int, m: int, n: int, gen: torch.Generator) -> SparseCodes:
    flat = torch.randperm(b * m, generator=gen)[:n].sort().values
    vals = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    bi = flat // m
    return SparseCodes(vals, bi, flat - bi * m, b, m, vals.min())


def test_sparse_decode_equals_dense_in_values_and_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    b, m, d = 24, 80, 12
    ends = torch.tensor([10, 30, 80])
    w = torch.randn(m, d, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(3, b, d, generator=gen, dtype=torch.float64)
    results = []
    for path in ("sparse", "dense"):
        codes = _random_codes(b, m, 150, torch.Generator().manual_seed(1))
        vals = codes.values.clone().requires_grad_(True)
        codes.values = vals
        w_ = w.clone().requires_grad_(True)
        if path == "sparse":
            out = sparse_decode_groups(codes, w_, ends)
        else:
            out = dense_decode_groups(codes.to_dense(), w_, ends)
        out.backward(grad_out)
        results.append((out.detach(), vals.grad, w_.grad))
    (o1, gv1, gw1), (o2, gv2, gw2) = results
    assert torch.allclose(o1, o2, atol=1e-12)
    assert torch.allclose(gv1, gv2, atol=1e-12)
    assert torch.allclose(gw1, gw2, atol=1e-12)


def test_sparse_decode_gradcheck() -> None:
    codes = _random_codes(6, 20, 15, torch.Generator().manual_seed(3))
    w = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    vals = codes.values.clone().requires_grad_(True)
    ends = torch.tensor([4, 20])

    def fn(v: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        c = SparseCodes(v, codes.batch_idx, codes.concept_idx, 6, 20, codes.min_kept)
        return sparse_decode_groups(c, w_, ends)

    assert torch.autograd.gradcheck(fn, (vals, w))


# ------------------------------------------------------------------ loss


def _dense_reference_loss(
    sae: MatryoshkaSAE, x: torch.Tensor, dead: torch.Tensor, alpha: float, weights: list[float] | None = None
) -> torch.Tensor:
    """Hand computation of the reference trainer's loss, dense (prefixes decoded from scratch).

    dictionary_learning's MatryoshkaBatchTopKTrainer: l2_g = w_g * mean_b ||x - x^_g||^2 with
    w_g = 1/G by default, loss = mean_g l2_g + alpha * AuxK (AuxK normalised by the residual's variance).
    """
    b, m = x.shape[0], sae.n_concepts
    g_count = len(sae.prefix_ends)
    weights = weights if weights is not None else [1.0 / g_count] * g_count
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    keep = torch.topk(pre.detach().relu().flatten(), sae.k * b).indices
    mask = torch.zeros(b * m, dtype=torch.bool)
    mask[keep] = True
    z = pre.relu() * mask.view(b, m)
    losses = []
    for w, end in zip(weights, sae.prefix_ends, strict=True):
        rec = z[:, :end] @ sae.W_dec[:end] + sae.b_dec
        losses.append(((x - rec) ** 2).sum(1).mean() * w)
    loss = torch.stack(losses).mean()
    resid = (x - rec).detach()
    aux_pre = torch.where(dead[None], pre.relu(), torch.tensor(-torch.inf, dtype=pre.dtype))
    top = torch.topk(aux_pre, sae.aux_k, dim=1)
    rec_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values) @ sae.W_dec
    l2 = ((resid - rec_aux) ** 2).sum(1).mean()
    return loss + alpha * l2 / ((resid - resid.mean(0)) ** 2).sum(1).mean()


@pytest.mark.parametrize(
    "mode,weighting,hand_weights",
    [
        ("sparse", "reference", None),  # the default: w_g = 1/G, then the mean over groups
        ("dense", "reference", None),
        ("sparse", "equal", [1.0, 1.0, 1.0]),
        ("sparse", [0.5, 2.0, 1.0], [0.5, 2.0, 1.0]),
    ],
)
def test_loss_and_gradients_match_reference_formula(mode: str, weighting, hand_weights) -> None:
    sae = perturbed_sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    codes = sae.encode_batchtopk(x)
    res = matryoshka_loss(sae, x, codes, dead, group_weights=weighting, aux_alpha=0.5, decode_mode=mode)
    res.loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref = _dense_reference_loss(sae, x, dead, 0.5, hand_weights)
    ref.backward()
    assert torch.allclose(res.loss.detach(), ref.detach(), rtol=1e-12)
    for name, p in sae.named_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=1e-9, atol=1e-12), name
    metrics = res.metrics()
    assert metrics["n_dead"] == float(dead.sum()) and metrics["aux_loss"] > 0
    assert set(f"fvu_prefix_{g}" for g in range(3)) <= metrics.keys()
    # the reference reconstruction term is (1/G) * mean_g MSE_g: a ninth of the prefix sum at G = 3
    if weighting == "reference":
        expected = res.prefix_mse.sum() / 9 + 0.5 * res.aux_loss
        assert float(res.loss.detach()) == pytest.approx(float(expected), rel=1e-12)


def test_group_weights_config() -> None:
    assert SAEConfig().group_weights == "reference"
    assert SAEConfig(depth=2, group_weights=[1.0, 3.0]).group_weights == [1.0, 3.0]
    with pytest.raises(ValueError, match="2 weights for 3 groups"):
        SAEConfig(depth=3, group_weights=[1.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        SAEConfig(depth=2, group_weights=[1.0, 0.0])
    with pytest.raises(ValueError):
        SAEConfig(group_weights="halves")
    # train_step uses the configured weighting: the same batch, "equal" reports G times the reconstruction loss
    losses = {}
    for weighting in ("reference", "equal"):
        cfg = SAEConfig(expansion=4, k=3, depth=3, group_weights=weighting, dead_tokens=10**9)
        sae = MatryoshkaSAE.from_config(16, cfg, seed=0)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        sae.init_from_batch(x)
        losses[weighting] = train_step(sae, make_optimizer(sae), x, cfg, 0)["loss"]
    assert losses["equal"] == pytest.approx(3 * losses["reference"], rel=1e-5)


def test_encoder_backward_gradcheck() -> None:
    sae = perturbed_sae(d=5, m=12, sizes=[4, 8], k=2)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    codes = sae.encode_batchtopk(x.detach())

    def fn(x_: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        pre = torch.addmm(b_enc, x_ - b_dec, w_enc)
        return pre.flatten()[codes.batch_idx * 12 + codes.concept_idx].relu()

    def ours(x_: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        from insight.sae.model import _SelectedPreActs

        vals = fn(x_, w_enc, b_enc, b_dec).detach()
        return _SelectedPreActs.apply(
            vals, x_, w_enc, b_enc, b_dec, codes.batch_idx, codes.concept_idx, codes.concept_order()
        )

    args = (x, sae.W_enc, sae.b_enc, sae.b_dec)
    g_out = torch.randn(codes.nnz, dtype=torch.float64)
    ref = torch.autograd.grad(fn(*args), args, g_out)
    got = torch.autograd.grad(ours(*args), args, g_out)
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


# ------------------------------------------------------------- training


def test_decoder_rows_unit_norm_and_parallel_grad_removed() -> None:
    cfg = SAEConfig(expansion=4, k=4, depth=2, dead_tokens=10**9)
    sae = MatryoshkaSAE.from_config(16, cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    sae.init_from_batch(torch.randn(256, 16, generator=gen))
    opt = make_optimizer(sae, 1e-2)
    for step in range(5):
        logs = train_step(sae, opt, torch.randn(128, 16, generator=gen), cfg, step)
        norms = sae.W_dec.detach().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert {"loss", "fvu", "l0", "grad_norm", "threshold", "dead_fraction"} <= logs.keys()
    # the gradient component along each decoder row is removed
    codes = sae.encode_batchtopk(torch.randn(64, 16, generator=gen))
    sae.zero_grad()
    matryoshka_loss(sae, torch.randn(64, 16, generator=gen), codes).loss.backward()
    assert float(torch.linalg.vecdot(sae.W_dec.grad, sae.W_dec.detach()).abs().max()) > 1e-4
    sae.remove_parallel_grads()
    parallel = torch.linalg.vecdot(sae.W_dec.grad, sae.W_dec.detach())
    assert float(parallel.abs().max()) < 1e-6


def test_dead_counter_takes_summed_counts() -> None:
    counter = torch.tensor([0, 5, 100, 7])
    fired = torch.tensor([0, 2, 0, 1])  # e.g. summed over workers
    update_dead_counter(counter, fired, 50)
    assert counter.tolist() == [50, 0, 150, 0]
    assert dead_mask(counter, 100).tolist() == [False, False, True, False]
    assert dead_fraction_per_group(dead_mask(counter, 40), [1, 3]) == [1.0, pytest.approx(1 / 3)]


def test_train_step_calls_reducers() -> None:
    cfg = SAEConfig(expansion=2, k=2, depth=1, threshold_start_step=0)
    sae = MatryoshkaSAE.from_config(8, cfg, seed=0)
    seen: dict[str, object] = {}

    def reduce_fired(fired: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        seen["fired"] = fired.clone()
        return fired * 2, n * 2  # as if two workers saw the same batch

    def reduce_min(value: torch.Tensor) -> torch.Tensor:
        seen["min"] = float(value)
        return value * 0 + 0.25

    train_step(sae, make_optimizer(sae), torch.randn(32, 8), cfg, 0, reduce_fired=reduce_fired, reduce_min=reduce_min)
    assert int(seen["fired"].sum()) == 2 * 32  # type: ignore[union-attr]
    assert sae.tokens_since_fired.max() == 64 or sae.tokens_since_fired.max() == 0
    assert float(sae.threshold) == pytest.approx(0.25)


def test_train_step_under_bf16_autocast() -> None:
    """bf16 autocast (the GPU benchmark's mode): the encoder matmul runs in bf16, the sparse
    decode, AuxK and both backward passes in the parameters' fp32; every parameter moves."""
    cfg = SAEConfig(expansion=4, k=2, depth=2, dead_tokens=16, threshold_start_step=0)
    sae = MatryoshkaSAE.from_config(8, cfg, seed=0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    sae.init_from_batch(x)
    sae.tokens_since_fired.fill_(16)  # every concept dead: AuxK runs too
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(sae, make_optimizer(sae, 1e-2), x, cfg, 0)
    assert out["n_dead"] == 32 and out["aux_loss"] > 0 and math.isfinite(out["loss"]) and out["l0"] > 0
    for n, p in sae.named_parameters():
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[n]), n


def test_threshold_ema() -> None:
    sae = MatryoshkaSAE(4, 8, k=1, threshold_beta=0.9, threshold_start_step=10, seed=0)
    sae.update_threshold(1.0, step=5)
    assert float(sae.threshold) == -1.0  # before the start step
    sae.update_threshold(1.0, step=10)
    assert float(sae.threshold) == pytest.approx(1.0)  # first update sets it
    sae.update_threshold(2.0, step=11)
    assert float(sae.threshold) == pytest.approx(1.1)
    sae.update_threshold(0.0, step=12)  # nothing positive kept: unchanged
    assert float(sae.threshold) == pytest.approx(1.1)


def test_geometric_median_resists_outliers() -> None:
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(200, 8, generator=gen) * 0.1 + 1.0
    pts[:20] += 100.0
    med = geometric_median(pts)
    assert float((med - 1.0).abs().max()) < 0.1
    assert float((pts.mean(0) - 1.0).abs().max()) > 5.0


def test_auxk_brings_dead_concepts_back() -> None:
    """Half the encoder is crippled so those concepts die; AuxK must revive them."""
    final = {}
    for alpha in (0.0, 1.0):
        gen = torch.Generator().manual_seed(0)
        atoms = random_atoms(gen)
        cfg = SAEConfig(expansion=2, k=ACTIVE, depth=1, dead_tokens=2048, aux_alpha=alpha, aux_k=16)
        sae = MatryoshkaSAE.from_config(D_TOY, cfg, seed=0)
        data = [planted(512, atoms, gen) for _ in range(20)]
        sae.init_from_batch(data[0])
        with torch.no_grad():
            sae.W_enc[:, 32:] *= 0.05
        opt = make_optimizer(sae, 3e-3)
        history = [train_step(sae, opt, data[s % 20], cfg, s)["dead_fraction"] for s in range(200)]
        final[alpha] = (max(history), sum(history[-20:]) / 20)
    assert final[0.0][1] >= 0.45  # without AuxK they stay dead
    assert final[1.0][0] >= 0.3  # with AuxK they died first ...
    assert final[1.0][1] <= 0.15  # ... and came back


@pytest.fixture(scope="module")
def planted_run() -> tuple[MatryoshkaSAE, torch.Tensor, torch.Generator]:
    """An SAE trained on planted sparse data (shared by the recovery and L0 tests)."""
    gen = torch.Generator().manual_seed(0)
    atoms = random_atoms(gen)
    cfg = SAEConfig(
        expansion=4,
        k=ACTIVE,
        group_fractions=[0.25, 0.75],
        dead_tokens=5000,
        threshold_start_step=100,
        threshold_beta=0.99,
        aux_k=16,
    )
    sae = MatryoshkaSAE.from_config(D_TOY, cfg, seed=0)
    sae.init_from_batch(planted(1024, atoms, gen))
    opt = make_optimizer(sae, 1e-2)
    for step in range(400):
        train_step(sae, opt, planted(512, atoms, gen), cfg, step)
    return sae, atoms, gen


def test_recovers_planted_dictionary(planted_run: tuple[MatryoshkaSAE, torch.Tensor, torch.Generator]) -> None:
    sae, atoms, gen = planted_run
    best_cos = (atoms @ sae.W_dec.detach().t()).max(dim=1).values
    assert float(best_cos.mean()) >= 0.9
    x = planted(2048, atoms, gen)
    with torch.no_grad():
        assert fvu(x, sae.decode(sae.encode(x))) < 0.2


def test_learned_threshold_gives_l0_near_k(planted_run: tuple[MatryoshkaSAE, torch.Tensor, torch.Generator]) -> None:
    sae, atoms, gen = planted_run
    assert float(sae.threshold) > 0
    with torch.no_grad():
        z = sae.encode(planted(2048, atoms, gen))
    assert abs(l0(z) - ACTIVE) <= 0.3 * ACTIVE
    x = planted(512, atoms, gen)
    with torch.no_grad():
        per_prefix = fvu_per_prefix(x, sae.decode_prefixes(sae.encode_batchtopk(x)))
    assert len(per_prefix) == 2 and per_prefix[1] < per_prefix[0] < 1.0


def test_calibrated_threshold_keeps_k_per_token(
    planted_run: tuple[MatryoshkaSAE, torch.Tensor, torch.Generator],
) -> None:
    import copy

    sae, atoms, gen = planted_run
    sae = copy.deepcopy(sae)
    with torch.no_grad():
        sae.threshold.fill_(0.5 * float(sae.threshold))  # a lagging EMA: far too low, L0 well above k
        x = planted(2048, atoms, gen)
        assert l0(sae.encode(x)) > 1.5 * ACTIVE
    batches = [planted(512, atoms, gen) for _ in range(4)]
    expected = sum(float(sae.encode_batchtopk(b, keep_pre_acts=False).min_kept) for b in batches) / 4
    seen = []

    def reduce_min(value: torch.Tensor) -> torch.Tensor:  # one worker: the mean over workers is the value
        seen.append(float(value))
        return value

    theta = calibrate_threshold(sae, iter(batches), 4, reduce_min=reduce_min)
    assert theta == pytest.approx(expected, rel=1e-6) and seen == [pytest.approx(expected, rel=1e-6)]
    with torch.no_grad():
        assert abs(l0(sae.encode(x)) - ACTIVE) <= 0.1 * ACTIVE


def test_heldout_threshold_keeps_k_on_shifted_tokens(
    planted_run: tuple[MatryoshkaSAE, torch.Tensor, torch.Generator],
) -> None:
    """Held-out tokens unlike the training ones (weaker atoms plus noise): the train-calibrated theta misses k
    there; the held-out rule is BatchTopK over the whole held-out set, exact whatever the chunking."""
    import copy

    sae, atoms, gen = planted_run
    sae = copy.deepcopy(sae)
    calibrate_threshold(sae, iter([planted(512, atoms, gen) for _ in range(4)]), 4)
    held = 0.5 * planted(1500, atoms, gen) + 0.3 * torch.randn(1500, atoms.shape[1], generator=gen)
    with torch.no_grad():
        assert abs(l0(sae.encode(held)) / sae.k - 1.0) > 0.25  # the shift the rule is for
        whole = float(sae.encode_batchtopk(held, keep_pre_acts=False).min_kept)
    theta = calibrate_threshold_heldout(sae, held, chunk=256)
    assert theta == pytest.approx(whole, rel=1e-6)
    assert calibrate_threshold_heldout(sae, held, chunk=4096) == pytest.approx(theta, rel=1e-6)
    with torch.no_grad():
        assert l0(sae.encode(held)) == pytest.approx(sae.k, abs=0.01)  # k per token, minus ties at theta


def test_metric_functions() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen)
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0)
    assert cosine(x, 3.0 * x) == pytest.approx(1.0)
    assert cosine(x, -x) == pytest.approx(-1.0)
    sae = MatryoshkaSAE(8, 32, [8, 24], k=2, seed=0)
    with torch.no_grad():
        codes = sae.encode_batchtopk(x)
    assert l0(codes) == pytest.approx(l0(codes.to_dense())) == pytest.approx(2.0)
    assert sum(group_l0(codes, sae.group_sizes)) == pytest.approx(2.0)
    assert group_l0(codes, sae.group_sizes) == pytest.approx(group_l0(codes.to_dense(), sae.group_sizes))


# ----------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    cfg = SAEConfig(expansion=4, k=3, depth=3, threshold_start_step=0)
    sae = MatryoshkaSAE.from_config(16, cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    sae.init_from_batch(torch.randn(128, 16, generator=gen))
    opt = make_optimizer(sae, 1e-3)
    for step in range(3):
        train_step(sae, opt, torch.randn(64, 16, generator=gen), cfg, step)
    path = tmp_path / "ckpt"
    save_sae(path, sae, {"sae": cfg.model_dump()}, opt.state_dict(), step=3)
    save_sae(path, sae, {"sae": cfg.model_dump()}, opt.state_dict(), step=3)  # overwrite is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["step"] == 3 and meta["sae"]["group_sizes"] == sae.group_sizes

    ck = load_checkpoint(path)
    loaded = ck.model
    assert ck.step == 3 and ck.config["sae"]["k"] == 3
    x = torch.randn(50, 16, generator=gen)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), loaded.encode(x))
        assert torch.equal(sae.decode(sae.encode(x)), loaded.decode(loaded.encode(x)))
    assert torch.equal(sae.threshold, loaded.threshold)
    assert torch.equal(sae.tokens_since_fired, loaded.tokens_since_fired)
    assert torch.equal(load_sae(path).W_enc, sae.W_enc)

    # the optimizer resumes exactly: one more step on both gives identical weights
    opt2 = make_optimizer(loaded, 1e-3)
    opt2.load_state_dict(ck.optimizer_state)
    x = torch.randn(64, 16, generator=gen)
    train_step(sae, opt, x, cfg, 3)
    train_step(loaded, opt2, x, cfg, 3)
    for (name, a), b in zip(sae.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_is_not_pickled(tmp_path) -> None:
    sae = MatryoshkaSAE(8, 16, [4, 12], k=2, seed=0)
    opt = make_optimizer(sae)
    train_step(sae, opt, torch.randn(16, 8), SAEConfig(expansion=2, k=2, depth=2), 0)
    path = save_sae(tmp_path / "c", sae, {}, opt.state_dict(), 1)
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
