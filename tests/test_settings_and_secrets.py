from __future__ import annotations

import stat

import pytest

from trainingmgr.config import Settings, SettingsError
from trainingmgr.secrets import MASK, SecretKeyError, TokenCipher


def test_settings_defaults_without_environment():
    s = Settings.from_env({})
    assert (s.host, s.port, s.log_level) == ("0.0.0.0", 32002, "INFO")
    assert s.sqlalchemy_url.startswith("sqlite:///") and s.sqlalchemy_url.endswith("/data/trainingmgr.db")


def test_settings_read_from_tm_variables(tmp_path):
    env = {
        "TM_HOST": "127.0.0.1",
        "TM_PORT": "8080",
        "TM_WORKERS": "4",
        "TM_DATA_DIR": str(tmp_path),
        "TM_DATABASE_URL": "postgresql+psycopg2://u@db/tm",
        "TM_LOG_LEVEL": "debug",
    }
    s = Settings.from_env(env)
    assert (s.host, s.port, s.workers) == ("127.0.0.1", 8080, 4)
    assert s.sqlalchemy_url == "postgresql+psycopg2://u@db/tm" and not s.is_sqlite
    assert s.data_path == tmp_path


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TM_PORT": "http"}, "TM_PORT must be an integer"),
        ({"TM_PORT": "70000"}, "TM_PORT must be between"),
        ({"TM_WORKERS": "0"}, "TM_WORKERS"),
        ({"TM_LOG_LEVEL": "chatty"}, "TM_LOG_LEVEL"),
        ({"TM_MAX_BODY_BYTES": "10"}, "TM_MAX_BODY_BYTES"),
        ({"TM_S3_BUCKET": "Models_Of_Mine"}, "TM_S3_BUCKET 'Models_Of_Mine' is not a valid S3 bucket name"),
        ({"TM_S3_BUCKET": "10.0.0.1"}, "TM_S3_BUCKET '10.0.0.1' is not a valid S3 bucket name: not an IP"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_token_cipher_round_trip_and_mask(tmp_path):
    cipher = TokenCipher("a passphrase", tmp_path)
    stored = cipher.encrypt("influx-token")
    assert "influx-token" not in stored
    assert cipher.decrypt(stored) == "influx-token"
    assert TokenCipher.mask(stored) == MASK
    assert cipher.encrypt("") == "" and TokenCipher.mask("") == ""


def test_token_cipher_key_rotation(tmp_path):
    old = TokenCipher("old-key", tmp_path)
    stored = old.encrypt("t0k3n")
    rotated = TokenCipher("new-key,old-key", tmp_path)
    assert rotated.decrypt(stored) == "t0k3n"
    with pytest.raises(SecretKeyError):
        TokenCipher("new-key", tmp_path).decrypt(stored)


def test_generated_key_file_is_private_and_reused(tmp_path):
    first = TokenCipher("", tmp_path)
    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert TokenCipher("", tmp_path).decrypt(first.encrypt("x")) == "x"
