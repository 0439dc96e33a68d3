"""Locations: hub ids and paths pass through; `scheme://NAME` goes to the resolver a plugin registered."""
import pytest

from maxent_rlhf import artifacts
from maxent_rlhf.config import ConfigError


def test_registered_scheme_resolves_and_others_pass_through(tmp_path):
    artifacts.register_scheme("unit-test", lambda name: tmp_path / name)
    assert artifacts.resolve_path("unit-test://sft") == str(tmp_path / "sft")
    assert "unit-test" in artifacts.registered_schemes()
    for plain in ("cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", str(tmp_path / "model"), "relative/dir"):
        assert artifacts.resolve_path(plain) == plain


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"'nolab://sft': no plugin registered the scheme nolab://.*register_scheme"):
        artifacts.resolve_path("nolab://sft")
    with pytest.raises(ValueError, match="lowercase letters"):
        artifacts.register_scheme("Bad Scheme", str)


def test_the_toy_lab_registers_itself_on_import():
    import maxent_rlhf.toylab  # noqa: F401
    from maxent_rlhf.judges import available_judges

    assert "toylab" in artifacts.registered_schemes() and "toy-gold" in available_judges()
