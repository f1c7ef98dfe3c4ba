"""eplb_pynccl.integrations.sglang's argument checks and its import without SGLang (no SGLang
needed: the checks run before SGLang is imported)."""

from __future__ import annotations

import pytest

from eplb_pynccl.integrations import sglang as S


@pytest.mark.parametrize(
    "kwargs,exc,text",
    [
        ({"transport": "gloo"}, ValueError, "transport must be one of"),
        ({"transport": 1}, TypeError, "transport must be a str"),
        ({"policy": "deepseek"}, ValueError, "policy must be None or 'migration_aware'"),
        ({"policy": 3}, TypeError, "policy must be None"),
        ({"timeout": 0}, ValueError, "timeout must be a positive finite"),
        ({"timeout": float("inf")}, ValueError, "timeout must be a positive finite"),
        ({"timeout": True}, TypeError, "timeout must be a number"),
        ({"staging_bytes": -1}, ValueError, "staging_bytes must be >= 0"),
        ({"staging_bytes": 1.5}, TypeError, "staging_bytes must be None or an int"),
    ],
)
def test_install_refuses_bad_arguments(kwargs, exc, text):
    with pytest.raises(exc, match=text.replace("(", r"\(")):
        S.install(**kwargs)
    assert S.installed() is None


def test_good_arguments_pass_the_checks():
    cfg = S._check_args("ipc", "migration_aware", 5, 1024)
    assert cfg == {
        "transport": "ipc",
        "policy": "migration_aware",
        "timeout": 5.0,
        "staging_bytes": 1024,
    }


def test_plugin_without_the_variable_patches_nothing(monkeypatch):
    monkeypatch.delenv(S.ENV, raising=False)
    S.plugin()
    assert S.installed() is None
