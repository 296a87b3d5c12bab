"""README's code runs as printed, and CI runs README's test command."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_after(marker: str) -> str:
    block = re.search(re.escape(marker) + r"\s*```bash\n(.*?)\n```", README, re.S)
    assert block, f"README has no bash block after {marker}"
    return block.group(1).strip()


def test_python_example_runs_and_fills_the_stats():
    code = re.search(r"```python\n(.*?)\n```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    block = scope["block"]
    assert block.forward_stats.converged.all()
    assert block.backward_stats is not None and block.backward_stats.converged.all()
    assert scope["y"].shape == (32, 4)


def test_ci_runs_readme_test_command():
    command = fenced_after("<!-- test-command -->")
    extracted = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True
    ).stdout
    assert extracted.strip() == command
    assert "pytest" in command and "-c constraints.txt" in command


def test_main_command_trains_example_one():
    command = fenced_after("<!-- main-command -->")
    assert "-c constraints.txt" in command
    assert command.endswith("python -m irnet fit --config configs/ex1_sine.yaml")
    assert (ROOT / "configs" / "ex1_sine.yaml").exists()
