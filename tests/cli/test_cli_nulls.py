"""A null given on the command line to an option two classes deep
(``--model.net.init_args.contraction null``)."""

from __future__ import annotations

import sys

import pytest

from helpers.training import CONFIGS
from irnet.cli import main
from irnet.cli.nulls import spell_nested_nulls


def test_nested_nulls_are_written_in_the_json_form_and_everything_else_is_left_alone():
    argv = [
        "fit",
        "--config",
        "c.yaml",
        "--model.net.init_args.contraction",
        "null",
        "--model.lr",
        "null",
        "--model.net.warm_start=None",
        "--trainer.max_epochs",
        "3",
        "--model.net.init_args.theta",
        "0.5",
    ]
    assert spell_nested_nulls(argv) == [
        "fit",
        "--config",
        "c.yaml",
        "--model.net",
        '{"init_args": {"contraction": null}}',
        "--model.lr",
        "null",
        "--model.net",
        '{"init_args": {"warm_start": null}}',
        "--trainer.max_epochs",
        "3",
        "--model.net.init_args.theta",
        "0.5",
    ]
    assert spell_nested_nulls(["--model.net.init_args.solver.init_args.max_iter", "~"]) == [
        "--model.net.init_args.solver",
        '{"init_args": {"max_iter": null}}',
    ]
    assert spell_nested_nulls(["--model.net.init_args.contraction"]) == [
        "--model.net.init_args.contraction"
    ]


@pytest.mark.parametrize(
    "spelling", [["--model.net.init_args.contraction", "null"], ["--model.net.contraction=null"]]
)
def test_contraction_null_on_the_command_line_turns_the_configs_contraction_off(
    tmp_path, monkeypatch, spelling
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["irnet"])  # parse only the test's arguments
    config = ["--config", str(CONFIGS / "ex1_sine.yaml")]
    assert main(config, run=False).model.net.contraction == 0.9  # the config's
    cli = main([*config, *spelling], run=False)
    assert cli.model.net.contraction is None
    # the rest of the net is kept
    assert len(cli.model.net.blocks) == 10 and cli.model.net.blocks[0].theta == 0.5


def test_sys_argv_is_rewritten_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "irnet",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            "--model.net.init_args.contraction",
            "null",
        ],
    )
    assert main(run=False).model.net.contraction is None
    assert sys.argv[-2:] == ["--model.net", '{"init_args": {"contraction": null}}']
