"""Validation of the pretraining-data section of the config (data.*)."""

from __future__ import annotations

import pytest

from bertscale.config import load_config
from bertscale.errors import ConfigError


@pytest.mark.parametrize("value,message", [
    ("[]", r"data.seq_lengths: List should have at least 1 item"),
    ("[4]", r"seq_lengths \[4\] out of range: each must be 8\.\.65535"),
    ("[128, 100000]", r"seq_lengths \[100000\] out of range"),
    ("[128, 128]", r"repeats a length"),
])
def test_bad_seq_lengths_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.seq_lengths={value}"])


def test_good_seq_lengths_load():
    assert load_config(None, ["data.seq_lengths=[128, 512]"]).data.seq_lengths == [128, 512]
