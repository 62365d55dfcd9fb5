"""Configuration layering: each boundary between two layers has its own test."""

from __future__ import annotations

import pytest

from milterguard import config as cfgmod
from milterguard import settings as S
from milterguard.config import ConfigError, load_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_when_etc_is_empty(tmp_path):
    cfg = load_config(etc_dir=tmp_path)
    assert cfg["thresholds"] == {"reject": 15.0, "review": 6.0, "tag": 4.0}
    assert cfg["actions.mode"] == "enforce"


def test_every_default_passes_its_own_validator():
    for setting in S.SETTINGS:
        assert setting.type(setting.default) == setting.default, setting.key


def test_shipped_defaults_file_is_generated_from_declarations():
    share = cfgmod.find_share_dir()
    assert (share / "conf" / "milterguard.yaml").read_text() == cfgmod.default_yaml()


def test_configuration_reference_is_up_to_date():
    share = cfgmod.find_share_dir()
    assert (share / "docs" / "configuration.md").read_text() == cfgmod.reference_markdown()


def test_local_d_deep_merges_into_defaults(tmp_path):
    write(tmp_path / "local.d" / "scoring.yaml", "thresholds: {reject: 12}\nsymbols: {SUBJ_FREE: {weight: 0.5}}\n")
    cfg = load_config(etc_dir=tmp_path)
    assert cfg["thresholds"] == {"reject": 12, "review": 6.0, "tag": 4.0}
    assert cfg["symbols"] == {"SUBJ_FREE": {"weight": 0.5}}
    assert cfg.origins["thresholds"].endswith("scoring.yaml:1")


def test_local_d_files_merge_in_name_order(tmp_path):
    write(tmp_path / "local.d" / "10-a.yaml", "symbols: {SUBJ_FREE: {weight: 0.5}}\nactions: {mode: shadow}\n")
    write(tmp_path / "local.d" / "20-b.yaml", "symbols: {SUBJ_FREE: {enabled: false}}\nactions: {mode: tag-only}\n")
    cfg = load_config(etc_dir=tmp_path)
    assert cfg["symbols"] == {"SUBJ_FREE": {"weight": 0.5, "enabled": False}}
    assert cfg["actions.mode"] == "tag-only"


def test_override_d_replaces_whole_section(tmp_path):
    write(tmp_path / "local.d" / "a.yaml", "actions: {mode: shadow, subject_tag: '[X]'}\n")
    write(tmp_path / "override.d" / "a.yaml", "actions: {mode: tag-only}\n")
    cfg = load_config(etc_dir=tmp_path)
    assert cfg["actions.mode"] == "tag-only"
    assert cfg["actions.subject_tag"] == "[SPAM]"  # back to the default: the section was replaced


def test_override_d_replaces_a_mapping_instead_of_merging(tmp_path):
    write(tmp_path / "local.d" / "a.yaml", "symbols: {SUBJ_FREE: {weight: 0.5}}\n")
    write(tmp_path / "override.d" / "a.yaml", "symbols: {SUBJ_ADV: {weight: 1}}\n")
    cfg = load_config(etc_dir=tmp_path)
    assert cfg["symbols"] == {"SUBJ_ADV": {"weight": 1}}


def test_config_file_flag_merges_after_override_d(tmp_path):
    write(tmp_path / "override.d" / "a.yaml", "actions: {mode: tag-only}\n")
    extra = write(tmp_path / "extra.yaml", "actions: {mode: shadow}\n")
    cfg = load_config(etc_dir=tmp_path, config_files=[extra])
    assert cfg["actions.mode"] == "shadow"


def test_set_flag_wins_over_files(tmp_path):
    extra = write(tmp_path / "extra.yaml", "thresholds: {reject: 12}\n")
    cfg = load_config(etc_dir=tmp_path, config_files=[extra], sets=["thresholds.reject=20", "milter.workers=3"])
    assert cfg["thresholds"]["reject"] == 20
    assert cfg["milter.workers"] == 3
    assert cfg.origins["milter.workers"] == "--set"


def test_set_is_typed_and_validated(tmp_path):
    with pytest.raises(ConfigError, match="milter.workers: expected an integer"):
        load_config(etc_dir=tmp_path, sets=["milter.workers=many"])
    with pytest.raises(ConfigError, match="unknown setting 'milter.nope'"):
        load_config(etc_dir=tmp_path, sets=["milter.nope=1"])
    cfg = load_config(etc_dir=tmp_path, sets=["message.spool_bytes=2M", "rules.files=a.yaml,b.yaml"])
    assert cfg["message.spool_bytes"] == 2 * 1024 * 1024
    assert cfg["rules.files"] == ["a.yaml", "b.yaml"]


def test_unknown_key_stops_with_file_and_line(tmp_path):
    write(tmp_path / "local.d" / "bad.yaml", "actions:\n  mode: enforce\n  modde: shadow\n")
    with pytest.raises(ConfigError) as err:
        load_config(etc_dir=tmp_path)
    assert "bad.yaml:3" in str(err.value) and "actions.modde" in str(err.value)


def test_wrong_type_stops_with_file_and_line(tmp_path):
    write(tmp_path / "local.d" / "bad.yaml", "\nthresholds: {reject: high}\n")
    with pytest.raises(ConfigError) as err:
        load_config(etc_dir=tmp_path)
    assert "bad.yaml:2" in str(err.value)


def test_missing_config_file_named_on_command_line_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(etc_dir=tmp_path, config_files=[tmp_path / "nope.yaml"])


def test_thresholds_must_be_ordered(tmp_path):
    with pytest.raises(ConfigError, match="tag <= review <= reject"):
        load_config(etc_dir=tmp_path, sets=["thresholds.tag=20"])


def test_each_part_of_a_merged_mapping_has_its_own_origin(tmp_path):
    write(tmp_path / "local.d" / "10-a.yaml", "symbols:\n  SUBJ_FREE: {weight: 0.5}\n  SUBJ_ALL_CAPS: {weight: 1}\n")
    write(tmp_path / "local.d" / "20-b.yaml", "symbols:\n  SUBJ_FREE:\n    enabled: false\n")
    cfg = load_config(etc_dir=tmp_path, sets=["thresholds.tag=5"])
    shipped = str(cfgmod.find_share_dir() / "conf" / "milterguard.yaml")
    assert cfg.origin("symbols", ("SUBJ_FREE", "weight")) == f"{tmp_path / 'local.d' / '10-a.yaml'}:2"
    assert cfg.origin("symbols", ("SUBJ_FREE", "enabled")) == f"{tmp_path / 'local.d' / '20-b.yaml'}:3"
    assert cfg.origin("symbols", ("SUBJ_ALL_CAPS", "weight")) == f"{tmp_path / 'local.d' / '10-a.yaml'}:3"
    assert cfg.origin("thresholds", ("tag",)) == "--set thresholds.tag"
    assert cfg.origin("thresholds", ("reject",)).startswith(shipped + ":")
    text = cfgmod.dump(cfg, origin=True)
    assert "symbols.SUBJ_ALL_CAPS: {weight: 1.0}    # " in text
    assert "thresholds.tag: 5.0    # --set thresholds.tag\n" in text
    # A section replaced by override.d takes its origin from there, whole.
    write(tmp_path / "override.d" / "symbols.yaml", "symbols:\n  SUBJ_FREE: {weight: 2}\n")
    cfg = load_config(etc_dir=tmp_path)
    assert cfg["symbols"] == {"SUBJ_FREE": {"weight": 2.0}}
    assert cfg.origin("symbols", ("SUBJ_FREE", "weight")) == f"{tmp_path / 'override.d' / 'symbols.yaml'}:2"
    assert (f"symbols: {{SUBJ_FREE: {{weight: 2.0}}}}    # {tmp_path / 'override.d' / 'symbols.yaml'}:2\n"
            in cfgmod.dump(cfg, origin=True))


def test_dump_shows_origins(tmp_path):
    write(tmp_path / "local.d" / "a.yaml", "actions: {mode: shadow}\n")
    text = cfgmod.dump(load_config(etc_dir=tmp_path), origin=True)
    assert "actions.mode: shadow    # " in text and "a.yaml:1" in text


@pytest.mark.parametrize("address", ["127.0.0.1:3310", "clamd.example.net:3310", "[::1]:3310", ":3310",
                                     "/run/clamav/clamd.ctl", "unix:/run/clamav/clamd.ctl", ""])
def test_clamav_address_forms_the_check_accepts(tmp_path, address):
    from milterguard.clients.clamd_client import Clamd

    cfg = load_config(etc_dir=tmp_path, sets=[f"clamav.address={address}"])
    assert cfg["clamav.address"] == address
    if address:
        Clamd(address, 1.0)  # builds the client; nothing connects yet


@pytest.mark.parametrize("address", ["tcp:127.0.0.1:3310", "127.0.0.1", "localhost:99999", "::1:3310",
                                     "[not-v6]:3310", "unix:clamd.ctl", "clamd host:3310"])
def test_clamav_address_is_checked_at_load(tmp_path, address):
    write(tmp_path / "local.d" / "clamav.yaml", f"clamav:\n  address: '{address}'\n")
    with pytest.raises(ConfigError, match=f"clamav.yaml:2: clamav.address: "):
        load_config(etc_dir=tmp_path)
    with pytest.raises(ConfigError, match="^--set: clamav.address: "):
        load_config(etc_dir=tmp_path / "empty", sets=[f"clamav.address={address}"])


def test_spool_dir_must_be_a_directory(tmp_path):
    assert load_config(etc_dir=tmp_path, sets=[f"message.spool_dir={tmp_path}"])["message.spool_dir"] == str(tmp_path)
    with pytest.raises(ConfigError, match=r"^--set: message.spool_dir: no directory '.*/nope'$"):
        load_config(etc_dir=tmp_path, sets=[f"message.spool_dir={tmp_path / 'nope'}"])
    write(tmp_path / "local.d" / "spool.yaml", f"message: {{spool_dir: '{tmp_path / 'local.d' / 'spool.yaml'}'}}\n")
    with pytest.raises(ConfigError, match=r"spool.yaml:1: message.spool_dir: '.*' is not a directory$"):
        load_config(etc_dir=tmp_path)


@pytest.mark.parametrize("mode", ["0999", "rw-rw----", "66O", "10660", ""])
def test_invalid_unix_socket_mode_stops_start(tmp_path, mode):
    with pytest.raises(ConfigError, match="milter.unix_socket_mode"):
        load_config(etc_dir=tmp_path, sets=[f"milter.unix_socket_mode={mode}"])


def test_unquoted_unix_socket_mode_in_yaml_is_refused(tmp_path):
    # YAML reads 0660 unquoted as the number 432 and 660 as 660: neither is what was meant.
    write(tmp_path / "local.d" / "mode.yaml", "milter:\n  unix_socket_mode: 660\n")
    with pytest.raises(ConfigError, match="quoted"):
        load_config(etc_dir=tmp_path)


@pytest.mark.parametrize("mode", ["0660", "660", "0600", "0o640"])
def test_unix_socket_mode_forms(tmp_path, mode):
    assert int(load_config(etc_dir=tmp_path, sets=[f"milter.unix_socket_mode={mode}"])["milter.unix_socket_mode"], 8) \
        == int(mode.replace("0o", ""), 8)


def test_redis_back_off_is_capped_at_a_few_seconds(tmp_path):
    # After a 12 s outage a worker stayed off longer than the outage (a 30 s cap).
    assert load_config(etc_dir=tmp_path)["redis.retry_max"] <= 5.0
