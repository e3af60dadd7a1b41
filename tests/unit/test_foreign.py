"""hvdclip/foreign.py: the versions its private uses were written for are checked at import, and a name
that is gone fails with what to do, not deep inside a traced step."""

import types

import pytest

from hvdclip import foreign
from hvdclip.errors import HvdClipError


def test_the_installed_versions_are_the_ones_written_for():
    foreign.check_versions({})  # What every import of hvdclip runs.
    assert foreign.installed_version("horovod") == "0.28.1"


@pytest.mark.parametrize("package, version", [("horovod", "0.28.2"), ("tensorflow", "2.22.0"), ("keras", "4.0.0")])
def test_another_release_is_refused_with_what_to_do(monkeypatch, package, version):
    real = foreign.installed_version
    monkeypatch.setattr(foreign, "installed_version", lambda name: version if name == package else real(name))
    with pytest.raises(foreign.ForeignVersionError, match=rf"private parts of {package} .*but {package} {version} is installed\. Install the versions in versions.env .*HVDCLIP_FOREIGN_VERSIONS=any"):
        foreign.check_versions({})
    foreign.check_versions({"HVDCLIP_FOREIGN_VERSIONS": "any"})  # The documented way past it.
    assert issubclass(foreign.ForeignVersionError, (HvdClipError, ImportError))


def test_a_private_name_that_is_gone_says_so_and_what_to_do():
    with pytest.raises(foreign.ForeignVersionError, match=r"keras.optimizers.Optimizer._learning_rate is gone: .*Install the versions in versions.env"):
        foreign.learning_rate_object(types.SimpleNamespace())


def test_a_missing_package_passes_the_check(monkeypatch):
    """The launcher imports foreign on head nodes without TensorFlow."""
    monkeypatch.setattr(foreign, "installed_version", lambda name: None)
    foreign.check_versions({})
