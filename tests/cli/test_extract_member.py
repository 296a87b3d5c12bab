"""``irnet extract-member``: one member of an ensemble checkpoint as a single network's checkpoint
that gives the member's outputs, keeps its warm-start cache, and resumes as the ensemble would."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers.training import CONFIGS, QUIET, tiny_net_overrides
from irnet.__main__ import main as irnet
from irnet.cli import main as cli
from irnet.cli.members import MEMBER_KEY, member_seed
from irnet.module import ImplicitNetModule
from irnet.nets.ensemble import member_state_dict

MEMBERS = 3
# float64, so that continuing a member and continuing the ensemble agree to rounding (here they
# agree bit for bit); warm starts, so that the member's cache is used by its first resumed step
# (resumed without it, the member's weights after two steps differ by 7e-9 relative, far outside
# the tolerance of 1e-12 below)
COMMON = [
    "--config",
    str(CONFIGS / "ex1_sine.yaml"),
    *tiny_net_overrides(2, 8),
    *QUIET,
    "--trainer.callbacks=[]",
    "--trainer.precision",
    "64-true",
    "--model.net.init_args.warm_start",
    "true",
]
ENSEMBLE = ["--model.net.init_args.ensemble", str(MEMBERS)]
LAST = Path("checkpoints") / "last.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder whose runs/ex1_sine/version_0 is a 3-member ensemble fitted for two epochs."""
    root = tmp_path_factory.mktemp("extract")
    fit(root, [*ENSEMBLE, "--trainer.max_epochs", "2"])
    return root


def fit(root: Path, args: list[str]):
    """``irnet fit`` in ``root`` (one run folder more under runs/ex1_sine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["irnet"])  # in-process runs parse only what they are given
        return cli(args=["fit", *COMMON, *args])


def ensemble_ckpt(runs: Path) -> Path:
    return runs / "runs" / "ex1_sine" / "version_0" / LAST


def extract(runs: Path, member: int, out: Path) -> Path:
    irnet(["extract-member", str(ensemble_ckpt(runs)), "--member", str(member), "--out", str(out)])
    return out


def refusal(capsys, args: list[str]) -> str:
    """The one error line of ``irnet extract-member *args`` (which must exit with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        irnet(["extract-member", *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("member", range(MEMBERS))
def test_member_gives_the_ensembles_rows_of_that_member(runs, tmp_path, member):
    source = torch.load(ensemble_ckpt(runs), weights_only=True)
    written = torch.load(extract(runs, member, tmp_path / "m.ckpt"), weights_only=True)
    net = written["hyper_parameters"]["net"]["init_args"]
    assert (net["ensemble"], net["member_seeds"]) == (1, None)
    assert written[MEMBER_KEY]["seed"] == member  # seed_everything: 0 in the saved config.yaml
    assert (written["epoch"], written["global_step"]) == (source["epoch"], source["global_step"])
    assert written["lr_schedulers"] == source["lr_schedulers"]
    ensemble = ImplicitNetModule.load_from_checkpoint(ensemble_ckpt(runs)).double().eval()
    single = ImplicitNetModule.load_from_checkpoint(tmp_path / "m.ckpt").double().eval()
    assert single.net.members == 1 and single.members == 1
    x = torch.linspace(-5, 5, 37, dtype=torch.float64)[:, None]
    with torch.no_grad():
        rows, alone = ensemble(x), single(x)
    assert rows.shape == (37 * MEMBERS, 1) and alone.shape == (37, 1)
    # the same weights; the ensemble's batched products round differently in the last bits
    torch.testing.assert_close(alone, rows[member::MEMBERS], rtol=0, atol=1e-12)
    assert (alone - rows[(member + 1) % MEMBERS :: MEMBERS]).abs().max() > 1e-3


def test_member_keeps_its_rows_of_the_warm_start_cache(runs, tmp_path):
    member = 2
    written = torch.load(extract(runs, member, tmp_path / "m.ckpt"), weights_only=True)
    source = torch.load(ensemble_ckpt(runs), weights_only=True)
    stacked = source["state_dict"]["net._extra_state"]["warm_start"]
    cache = written["state_dict"]["net._extra_state"]["warm_start"]
    assert cache["keys"] == stacked["keys"] and len(cache["keys"]) >= 51  # the training inputs
    stored = [r for r in stacked["rows"] if r is not None]
    assert stored, "the ensemble cached no fixed points"
    for whole, part in zip(stacked["rows"], cache["rows"]):
        if whole is not None:
            assert torch.equal(part, whole.reshape(len(whole), MEMBERS, -1)[:, member])
    net = ImplicitNetModule.load_from_checkpoint(tmp_path / "m.ckpt").net
    assert net.warm_start_cache.state_dict()["keys"] == stacked["keys"]


def test_continuing_the_member_continues_it_as_the_ensemble_would(runs, tmp_path):
    member = 1
    out = extract(runs, member, tmp_path / "member.ckpt")
    more = ["--trainer.max_epochs", "4"]
    ensemble = fit(runs, [*more, *ENSEMBLE, "--ckpt_path", str(ensemble_ckpt(runs))])
    alone = fit(runs, [*more, "--ckpt_path", str(out)])  # the config's ensemble: 1
    assert alone.model.net.members == 1 and ensemble.model.net.members == MEMBERS
    assert alone.trainer.global_step == ensemble.trainer.global_step == 4  # two more steps
    expected = member_state_dict(ensemble.model.state_dict(), member, MEMBERS, prefix="net.")
    got = alone.model.state_dict()
    start = torch.load(out, weights_only=True)["state_dict"]
    weights = [k for k in got if not k.endswith("_extra_state")]
    assert weights and set(got) == set(expected)
    for key in weights:
        assert not torch.equal(got[key], start[key]), f"{key} did not train"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-14, msg=key)
    # Adam's moments too: the member's run has the member's optimiser
    moments = ensemble.trainer.optimizers[0].state_dict()["state"]
    for index, state in alone.trainer.optimizers[0].state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                state[name], moments[index][name][member], rtol=1e-12, atol=1e-18
            )


def test_the_runs_config_is_not_needed(runs, tmp_path):
    alone = tmp_path / "elsewhere.ckpt"  # no config.yaml in its folder's parent
    alone.write_bytes(ensemble_ckpt(runs).read_bytes())
    irnet(["extract-member", str(alone), "--member", "1", "--out", str(tmp_path / "m.ckpt")])
    written = torch.load(tmp_path / "m.ckpt", weights_only=True)
    seed = torch.load(alone, weights_only=False)["member_seeds"][1]  # the module records them
    assert written[MEMBER_KEY] == {"member": 1, "members": 3, "seed": seed, "source": str(alone)}
    assert ImplicitNetModule.load_from_checkpoint(tmp_path / "m.ckpt").net.members == 1


def test_member_seed_is_its_given_seed_else_the_runs_seed_plus_member(tmp_path):
    def ckpt(seeds):
        return {"hyper_parameters": {"net": {"init_args": {"ensemble": 3, "member_seeds": seeds}}}}

    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    assert member_seed(ckpt([7, 9, 11]), 1, path) == 9
    assert member_seed({**ckpt(None), "member_seeds": [5, 6, 8]}, 2, path) == 8  # as recorded
    assert member_seed(ckpt(None), 1, path) is None  # no config.yaml beside the run
    config = "seed_everything: {}\nmodel:\n  init_args:\n    net:\n      init_args:\n"
    (tmp_path / "run" / "config.yaml").write_text(config.format(40) + "        ensemble: 3\n")
    assert member_seed(ckpt(None), 2, path) == 42
    # a config.yaml of another network, or without a seed, says nothing about this one
    (tmp_path / "run" / "config.yaml").write_text(config.format(40) + "        ensemble: 5\n")
    assert member_seed(ckpt(None), 2, path) is None
    (tmp_path / "run" / "config.yaml").write_text(config.format("true") + "        ensemble: 3\n")
    assert member_seed(ckpt(None), 2, path) is None


def test_refuses_a_network_that_is_not_an_ensemble(runs, tmp_path, capsys):
    ckpt = torch.load(ensemble_ckpt(runs), weights_only=True)
    ckpt["hyper_parameters"]["net"]["init_args"]["ensemble"] = 1
    torch.save(ckpt, tmp_path / "single.ckpt")
    line = refusal(capsys, [str(tmp_path / "single.ckpt"), "--member", "0", "--out", "o.ckpt"])
    assert "CKPT: not an ensemble" in line and "ensemble: E >= 2" in line
    # a module built in Python saves no description of its network
    del ckpt["hyper_parameters"]["net"]
    torch.save(ckpt, tmp_path / "python.ckpt")
    line = refusal(capsys, [str(tmp_path / "python.ckpt"), "--member", "0", "--out", "o.ckpt"])
    assert "CKPT: its hyper-parameters do not describe the network" in line


@pytest.mark.parametrize("member", ["3", "-1"])
def test_refuses_a_member_out_of_range(runs, tmp_path, capsys, member):
    out = tmp_path / "m.ckpt"
    line = refusal(capsys, [str(ensemble_ckpt(runs)), "--member", member, "--out", str(out)])
    assert "--member: must be one of 0 … 2" in line and f"got {member}" in line
    assert not out.exists()


def test_refuses_a_missing_or_unreadable_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nowhere.ckpt"
    line = refusal(capsys, [str(missing), "--member", "0", "--out", str(tmp_path / "m.ckpt")])
    assert f"CKPT: no such checkpoint file: {missing}" in line
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint\n")
    line = refusal(capsys, [str(garbage), "--member", "0", "--out", str(tmp_path / "m.ckpt")])
    assert "is not a readable checkpoint" in line


def test_refuses_to_overwrite_unless_forced(runs, tmp_path, capsys):
    out = tmp_path / "m.ckpt"
    out.write_text("precious\n")
    line = refusal(capsys, [str(ensemble_ckpt(runs)), "--member", "0", "--out", str(out)])
    assert f"--out: {out} exists" in line and "--force" in line
    assert out.read_text() == "precious\n"
    irnet(
        ["extract-member", str(ensemble_ckpt(runs)), "--member", "0", "--out", str(out), "--force"]
    )
    assert torch.load(out, weights_only=True)[MEMBER_KEY]["member"] == 0


def test_refuses_to_overwrite_the_ensemble_itself_or_a_folder(runs, tmp_path, capsys):
    ckpt = str(ensemble_ckpt(runs))
    line = refusal(capsys, [ckpt, "--member", "0", "--out", ckpt, "--force"])
    assert "--out:" in line and "is CKPT itself" in line
    line = refusal(capsys, [ckpt, "--member", "0", "--out", str(tmp_path), "--force"])
    assert f"--out: {tmp_path} is a folder" in line


def test_a_missing_argument_is_one_line(tmp_path, capsys):
    line = refusal(capsys, [str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "m.ckpt")])
    assert "--member" in line and "extract-member --help" in line


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        irnet(["extract-member", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("CKPT", "--member K", "--out OUT", "--force", "ensemble: 1", "--ckpt_path"):
        assert words in text
