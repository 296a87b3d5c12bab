"""``compile=True`` gives the eager network's numbers.

Slow: torch.compile takes a while on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from irnet.nets import ODENet


@pytest.mark.slow
def test_compiled_residuals_match_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # inductor's cache stays inside the test's folder
    torch.manual_seed(0)
    eager = ODENet(1, 1, layers=2, T=1.0, width=8, theta=0.5)
    compiled = ODENet(1, 1, layers=2, T=1.0, width=8, theta=0.5, compile=True)
    compiled.load_state_dict(eager.state_dict())  # same keys: compiled in place
    x = torch.linspace(-1, 1, 5)[:, None]
    outputs = []
    for net in (eager, compiled):
        y = net(x)
        y.pow(2).sum().backward()
        outputs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    (y0, g0), (y1, g1) = outputs
    assert torch.allclose(y0, y1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_compile_flag_is_checked():
    with pytest.raises(ValueError, match="compile"):
        ODENet(1, 1, layers=1, compile="yes")
