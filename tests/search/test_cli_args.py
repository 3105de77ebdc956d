"""search.cli_args: the CLIs' options come from RunConfig's field metadata, defaults and help written once."""

from dataclasses import fields

import pytest

from search import cli_args
from search.config import RunConfig


def test_no_options_give_the_default_config_and_every_field_is_an_option():
    assert cli_args.parse_config([]) == RunConfig()
    options = {a.dest for a in cli_args.parser("x", "")._actions}
    assert {f.name for f in fields(RunConfig)} <= options
    assert all(f.metadata["help"] and f.metadata["group"] in cli_args.GROUP_TITLES for f in fields(RunConfig))


def test_flags_types_and_actions_follow_the_metadata():
    config = cli_args.parse_config(["--no-drop", "--no-export", "--domain", "a=x.txt", "--domain", "b=y.txt",
                                    "--format", "gguf", "--trials", "3", "--distill", "0.25", "--no-local-table"])
    assert (config.allow_drop, config.export, config.local_table) == (False, False, False)
    assert config.domains == ("a=x.txt", "b=y.txt") and config.trials == 3 and config.distill == 0.25
    assert config.export_format == "gguf" and config.ffn_step == 32  # the GGUF type's block, as without the CLI
    with pytest.raises(SystemExit):
        cli_args.parse_config(["--importance", "magnitude"])  # choices come from the metadata too


def test_help_states_each_default_once():
    text = cli_args.parser("python -m search.run", "").format_help()
    assert "(default: 24)" in text and "(default: the shipped reference model)" in text
    assert "(default: %" not in text and "(default: (default" not in text


def test_the_export_parser_offers_only_what_follows_the_search_and_keeps_the_run_s_settings():
    p = cli_args.parser("python -m search.export", "", cli_args.AFTER_SEARCH, keep_run_settings=True)
    assert cli_args.config_values(p.parse_args([]), cli_args.AFTER_SEARCH) == {}  # the run's --task stays
    given = p.parse_args(["--recover-steps", "3", "--domain", "a=x.txt", "--no-reconstruct"])
    assert cli_args.config_values(given, cli_args.AFTER_SEARCH) == {"recover_steps": 3, "domains": ["a=x.txt"],
                                                                    "reconstruct": False}
    with pytest.raises(SystemExit):
        p.parse_args(["--budget", "50%"])  # the search's settings cannot change after it
    assert "(default: the run's own)" in p.format_help()
