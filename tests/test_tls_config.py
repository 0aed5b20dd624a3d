"""relayd's own TLS pair at start: what ``serve`` and ``check-config`` refuse and warn
about, in the same words (issue 13). The certificates come from a throwaway CA."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trustme

from relayd.cli import main
from relayd.config import ConfigError, load_settings
from tests.conftest import RELAY_KEY
from tests.fakes.openai import UPSTREAM_KEY

NOW = dt.datetime.now(dt.UTC)


def write_pair(
    ca: trustme.CA, where: Path, *, days: float = 90, start: float = -1, name: str = "relay"
) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 valid from ``start`` to ``days`` days from now."""
    cert = ca.issue_cert(
        "127.0.0.1",
        "localhost",
        not_before=NOW + dt.timedelta(days=start),
        not_after=NOW + dt.timedelta(days=days),
    )
    cert_file, key_file = where / f"{name}.crt", where / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    return cert_file, key_file


def env_for(cert: Path | None, key: Path | None, **extra: str) -> dict[str, str]:
    env = {"OPENAI_API_KEY": UPSTREAM_KEY, "RELAYD_KEYS": f"team:{RELAY_KEY}", **extra}
    if cert is not None:
        env["RELAYD_TLS_CERT_FILE"] = str(cert)
    if key is not None:
        env["RELAYD_TLS_KEY_FILE"] = str(key)
    return env


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    return str(caught.value)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_a_good_pair_loads_from_env_and_toml_and_names_its_source(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca, tmp_path)
    settings = load_settings(environ=env_for(cert, key))
    assert (settings.server.tls_cert, settings.server.tls_key) == (str(cert), str(key))
    assert settings.sources["server.tls_cert"] == "env RELAYD_TLS_CERT_FILE"
    assert not [w for w in settings.warnings if "TLS" in w]
    config = tmp_path / "relayd.toml"
    config.write_text(f'[server]\ntls_cert = "{cert.name}"\ntls_key = "{key.name}"\n')
    settings = load_settings(config, environ=env_for(None, None))
    assert settings.server.tls_key == str(key)  # relative to the config file


def test_systemd_credentials_tls_cert_and_tls_key_are_found(ca: trustme.CA, tmp_path: Path) -> None:
    write_pair(ca, tmp_path, name="tls")
    (tmp_path / "tls.crt").rename(tmp_path / "tls_cert")
    (tmp_path / "tls.key").rename(tmp_path / "tls_key")
    settings = load_settings(environ=env_for(None, None, CREDENTIALS_DIRECTORY=str(tmp_path)))
    assert settings.server.tls_cert == str(tmp_path / "tls_cert")
    assert settings.sources["server.tls_key"] == "credential tls_key"


@pytest.mark.parametrize("given", ["cert", "key"])
def test_one_file_alone_is_refused(ca: trustme.CA, tmp_path: Path, given: str) -> None:
    cert, key = write_pair(ca, tmp_path)
    message = refusal(env_for(cert, None) if given == "cert" else env_for(None, key))
    assert "needs both the certificate and its key" in message


def test_a_key_for_another_certificate_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    cert, _ = write_pair(ca, tmp_path, name="one")
    _, other_key = write_pair(ca, tmp_path, name="two")
    message = refusal(env_for(cert, other_key))
    assert f"TLS key file {str(other_key)!r} does not match the certificate" in message
    assert "BEGIN" not in message  # never the key itself


def test_unreadable_and_wrong_files_say_which_file_and_why(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path)
    missing = tmp_path / "nope.crt"
    assert refusal(env_for(missing, key)) == (
        f"cannot read TLS certificate file {str(missing)!r}: No such file or directory"
    )
    assert "holds no PEM certificate" in refusal(env_for(key, key))
    assert "holds no PEM private key" in refusal(env_for(cert, cert))


def test_expired_and_not_yet_valid_certificates_are_refused(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path, start=-30, days=-1, name="old")
    assert "expired on" in refusal(env_for(cert, key))
    cert, key = write_pair(ca, tmp_path, start=2, days=30, name="early")
    assert "is not valid before" in refusal(env_for(cert, key))


def test_fewer_than_14_days_left_is_a_warning(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path, days=5)
    (warning,) = [w for w in load_settings(environ=env_for(cert, key)).warnings if "TLS" in w]
    assert warning.startswith(f"TLS certificate {str(cert)!r} expires in 4 days")


def test_serve_and_check_config_refuse_a_bad_pair_in_the_same_words(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cert, _ = write_pair(ca, tmp_path, name="one")
    _, other_key = write_pair(ca, tmp_path, name="two")
    for name, value in env_for(cert, other_key, RELAYD_LISTEN="127.0.0.1:1").items():
        monkeypatch.setenv(name, value)
    said = []
    for command in ("check-config", "serve"):
        assert main([command]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        said.append(err)
    assert said[0] == said[1] and "does not match the certificate" in said[0]


def test_check_config_warns_of_a_near_expiry(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cert, key = write_pair(ca, tmp_path, days=3)
    for name, value in env_for(cert, key).items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 0
    assert "relayd: warning: TLS certificate" in capsys.readouterr().err
