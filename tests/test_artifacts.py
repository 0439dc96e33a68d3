"""Locations and plugins: hub ids and paths pass through; `scheme://NAME` goes to the resolver of its
scheme, registered in the process or found as an installed entry point (the toy lab's `toylab://` and
`toy-gold` are found this way: this module imports no toy-lab code)."""
import sys
from importlib.metadata import EntryPoint

import pytest

from maxent_rlhf import artifacts, judges
from maxent_rlhf.config import ConfigError


def test_registered_scheme_resolves_and_others_pass_through(tmp_path):
    artifacts.register_scheme("unit-test", lambda name: tmp_path / name)
    assert artifacts.resolve_path("unit-test://sft") == str(tmp_path / "sft")
    assert "unit-test" in artifacts.known_schemes()
    for plain in ("cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", str(tmp_path / "model"), "relative/dir"):
        assert artifacts.resolve_path(plain) == plain


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"'nolab://sft': no installed plugin provides the scheme nolab://"
                                          r".*maxent_rlhf.locations.*pip install -e"):
        artifacts.resolve_path("nolab://sft")
    with pytest.raises(ValueError, match="lowercase letters"):
        artifacts.register_scheme("Bad Scheme", str)


def fake_plugin(tmp_path, monkeypatch):
    """A third-party plugin as an installed package declares it: a module on sys.path and entry points in
    the two groups (the lookup of installed metadata is replaced by one that also lists them)."""
    (tmp_path / "fakeplugin.py").write_text(
        "from maxent_rlhf.judges import Judge, Judgment\n"
        "class Always(Judge):\n"
        "    def __init__(self, answer): self.answer = answer\n"
        "    def judge_pair(self, pair): return Judgment(self.answer)\n"
        "def always(settings): return Always(settings.option('answer', 'A'))\n"
        "def resolve(name): return '/data/fake/' + name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = {"maxent_rlhf.judges": [EntryPoint("always", "fakeplugin:always", "maxent_rlhf.judges")],
            "maxent_rlhf.locations": [EntryPoint("fakelab", "fakeplugin:resolve", "maxent_rlhf.locations")]}
    real = artifacts.entry_points

    def entry_points(group, name=None):
        found = [ep for ep in fake.get(group, []) if name in (None, ep.name)]
        return found + list(real(group=group, **({} if name is None else {"name": name})))

    monkeypatch.setattr(artifacts, "entry_points", entry_points)


def test_a_plugin_declared_as_an_entry_point_is_found_on_first_use(tmp_path, monkeypatch):
    fake_plugin(tmp_path, monkeypatch)
    assert "fakeplugin" not in sys.modules  # nothing imported it: the lookup does, on first use
    assert "fakelab" in artifacts.known_schemes() and "always" in judges.available_judges()
    assert artifacts.resolve_path("fakelab://sft") == "/data/fake/sft"
    from maxent_rlhf.evaluation import judge_settings
    from evaluate_judge import EvalConfig

    judge = judges.get_judge("always", judge_settings(EvalConfig(judge_kwargs='{"answer": "B"}'), None))
    assert judge.judge_pair(None).preferred == "B" and judge.name == "always"
    with pytest.raises(ConfigError, match="judge_kwargs: judge 'always' takes no option colour.*reads: answer"):
        judges.get_judge("always", judge_settings(EvalConfig(judge_kwargs='{"colour": 1}'), None))


def test_the_toy_lab_is_found_through_its_installed_entry_points(tmp_path, monkeypatch):
    """Needs the package installed (`pip install -e .`): the entry points live in its metadata."""
    assert "toylab" in artifacts.known_schemes() and "toy-gold" in judges.available_judges()
    with pytest.raises(ValueError, match="unknown toy-lab artifact 'nothing'"):  # the toy lab's resolver answered
        artifacts.resolve_path("toylab://nothing")
    monkeypatch.setenv("MAXENT_RLHF_CACHE", str(tmp_path))
    assert artifacts.resolve_path("toylab://test/tokenizer") == str(tmp_path / "test" / "tokenizer")
    from maxent_rlhf.evaluation import judge_settings
    from evaluate_judge import EvalConfig

    assert judges.get_judge("toy-gold", judge_settings(EvalConfig(), None)).cache_id.startswith("toy-gold/")
