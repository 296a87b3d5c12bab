"""SolverStatistics logs the cosine between the shortcut and the exact gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.callbacks import events, fit, loader, scalar, sine_data, sine_module
from irnet.callbacks import SolverStatistics
from irnet.linear import Direct, JacobianFree, Neumann


def _cosine_by_hand(module, x, y) -> float:
    """The two parameter gradients of the MSE loss, by backward with each adjoint; their cosine."""
    grads = []
    for solver in (JacobianFree(), Direct()):
        for block in module.net.blocks:
            block.linear_solver = solver
        module.zero_grad()
        torch.nn.functional.mse_loss(module.net(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.net.parameters()]))
    a, b = grads
    return float(a @ b / (a.norm() * b.norm()))


def test_shortcut_adjoint_logs_its_gradient_cosine(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = sine_module(layers=2, theta=1.0, linear_solver=JacobianFree())
    x, y = sine_data(21)
    callback = SolverStatistics(
        per_layer=False, histograms=False
    )  # on by itself: the adjoint is a shortcut
    trainer = fit(module, [callback], tmp_path, loader(x, y), epochs=10)
    values = scalar(events(trainer.logger.log_dir), "solver/gradient_cosine")
    assert len(values) == 1  # every 10 epochs by default
    # the weights after the last step are those the probe saw at the end of the epoch
    assert values[-1] == pytest.approx(_cosine_by_hand(module, x, y), abs=1e-5)
    assert values[-1] < 0.9999  # the Jacobian-free direction differs from the exact one


def test_exact_adjoint_logs_no_cosine_unless_asked(tmp_path: Path) -> None:
    module = sine_module(layers=2, linear_solver=Neumann())
    trainer = fit(
        module,
        [SolverStatistics(per_layer=False, histograms=False)],
        tmp_path,
        loader(*sine_data(21)),
        epochs=2,
    )
    assert not any("gradient_cosine" in t for t in events(trainer.logger.log_dir).Tags()["scalars"])
    module = sine_module(layers=2, linear_solver=Neumann(rtol=1e-9, max_iter=500))
    trainer = fit(
        module,
        [SolverStatistics(per_layer=False, histograms=False, fidelity_every_n_epochs=1)],
        tmp_path / "asked",
        loader(*sine_data(21)),
        epochs=2,
    )
    values = scalar(events(trainer.logger.log_dir), "solver/gradient_cosine")
    assert len(values) == 2 and all(v == pytest.approx(1.0, abs=1e-5) for v in values)


@pytest.mark.parametrize("kwargs", [{"fidelity_every_n_epochs": -1}, {"fidelity_samples": 0}])
def test_fidelity_arguments_are_checked(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SolverStatistics(**kwargs)
