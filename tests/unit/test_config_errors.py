"""An invalid file fails with one line per problem: file, field path, bad value, what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.config import (
    DataDictionary,
    SiteConfig,
    StudyConfig,
    load_yaml,
    parse_model,
)
from protocol.errors import ConfigError

SITE = """\
name: cleveland
coordinator: "127.0.0.1:50051"
dictionary: dictionary.yaml
data: {path: cleveland.csv}
insecure: true
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, model: type[DataDictionary] | type[SiteConfig]) -> str:
    with pytest.raises(ConfigError) as info:
        load_yaml(path, model)
    return str(info.value)


def test_valid_site_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_yaml(write(tmp_path, "site.yaml", SITE), SiteConfig)
    assert config.name == "cleveland"
    assert config.data.path == (tmp_path / "cleveland.csv").resolve()
    assert config.dictionary == (tmp_path / "dictionary.yaml").resolve()
    assert config.policy.allowed_analyses == []  # default deny


def test_malformed_yaml_gives_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dictionary.yaml",
        "variables:\n  age: {type: numeric, min: 0, max: 120\n  sex: {type: binary}\n",
    )
    message = error_of(path, DataDictionary)
    # The unclosed brace on line 2 is noticed at line 3, column 6, where the parser stops.
    assert message.startswith(f"{path}: malformed YAML at line 3, column 6:")
    assert "\n" not in message


def test_tab_indentation_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "dictionary.yaml", "variables:\n\tage: {type: binary}\n")
    message = error_of(path, DataDictionary)
    assert message.startswith(f"{path}: malformed YAML at line 2, column 1:")
    assert "'\\t'" in message


def test_bad_privacy_mode_gives_file_field_value_and_allowed(tmp_path: Path) -> None:
    text = SITE + "policy:\n  studies:\n    - id: cardio-2026\n    - id: other\n      mode: exact\n"
    path = write(tmp_path, "site.yaml", text)
    assert error_of(path, SiteConfig) == (
        f"{path}: policy.studies[1].mode: 'exact' is not allowed; use one of: dp, sdc, off"
    )


def test_bad_study_privacy_mode(tmp_path: Path) -> None:
    path = write(tmp_path, "study.yaml", "id: s1\ntitle: T\nprivacy: {mode: none}\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, StudyConfig)
    assert str(info.value) == (
        f"{path}: privacy.mode: 'none' is not allowed; use one of: dp, sdc, off"
    )


def test_unknown_field_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", SITE + "heartbeat: 3\n")
    assert error_of(path, SiteConfig) == (
        f"{path}: heartbeat: is not a known field (check the spelling)"
    )


def test_unknown_nested_field_names_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", SITE + "policy:\n  sdc: {min_cells: 5}\n")
    assert error_of(path, SiteConfig) == (
        f"{path}: policy.sdc.min_cells: is not a known field (check the spelling)"
    )


@pytest.mark.parametrize(("low", "high"), [(120, 0), (5, 5)])
def test_min_not_below_max(tmp_path: Path, low: int, high: int) -> None:
    text = f"variables:\n  age: {{type: numeric, min: {low}, max: {high}, unit: years}}\n"
    path = write(tmp_path, "dictionary.yaml", text)
    assert error_of(path, DataDictionary) == (
        f"{path}: variables.age: min ({float(low)}) must be below max ({float(high)})"
    )


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    text = (
        "variables:\n"
        "  age: {type: numeric, min: 10, max: 5}\n"
        "  sex: {type: categorical, levels: [0, 1], colour: red}\n"
        "  bmi: {type: numbr}\n"
    )
    path = write(tmp_path, "dictionary.yaml", text)
    lines = error_of(path, DataDictionary).splitlines()
    assert lines == [
        f"{path}: variables.age: min (10.0) must be below max (5.0)",
        f"{path}: variables.sex.colour: is not a known field (check the spelling)",
        f"{path}: variables.bmi: type 'numbr' is not allowed; use one of: numeric, categorical, "
        "binary",
    ]


def test_missing_required_field(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", SITE.replace("name: cleveland\n", ""))
    assert error_of(path, SiteConfig) == f"{path}: name: is required but missing"


def test_site_name_pattern_shows_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", SITE.replace("name: cleveland", "name: 9 lives"))
    message = error_of(path, SiteConfig)
    assert message.startswith(f"{path}: name: '9 lives': String should match pattern")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "site.yaml", "- name: cleveland\n")
    assert error_of(path, SiteConfig) == (
        f"{path}: expected a mapping of fields at the top, got list"
    )


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    assert (
        error_of(tmp_path / "nope.yaml", SiteConfig) == f"{tmp_path / 'nope.yaml'}: file not found"
    )
    assert error_of(tmp_path, SiteConfig).startswith(f"{tmp_path}: cannot read (")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes(b"name: Z\xfcrich\n")  # Latin-1, as an old Windows editor saves it
    with pytest.raises(ConfigError, match=r"site\.yaml"):
        load_yaml(path, SiteConfig)


def test_parse_model_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model(StudyConfig, {"id": "s1", "title": "T", "expires": "soon"}, "request #7")
    assert str(info.value).startswith("request #7: expires: 'soon': ")


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("id: s1\ntitle: T\nid: s2\n")
    with pytest.raises(
        ConfigError,
        match=r"study\.yaml: malformed YAML at line 3, column 1: "
        r"key 'id' is given twice",
    ):
        load_yaml(path, StudyConfig)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (
            "{token: 0123456789abcdef-admin, user: it.va, role: site_admin}",
            "tokens[0]: user 'it.va' has role site_admin but no site; name the site they run",
        ),
        (
            "{token: 0123456789abcdef-chen, user: r.chen, role: researcher, site: va}",
            "tokens[0]: user 'r.chen' has role researcher and site 'va'; only a site_admin "
            "token names a site",
        ),
    ],
    ids=["site-admin-without-site", "researcher-with-site"],
)
def test_a_token_names_a_site_exactly_when_it_is_a_site_admins(
    tmp_path: Path, token: str, message: str
) -> None:
    from protocol.config import CoordinatorConfig

    text = f"dictionary: d.yaml\ninsecure: true\ntokens:\n  - {token}\n"
    path = write(tmp_path, "coordinator.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_yaml(path, CoordinatorConfig)
    assert str(info.value).startswith(f"{path}: {message}")
    admin = "{token: 0123456789abcdef-admin, user: it.va, role: site_admin, site: va}"
    good = write(tmp_path, "ok.yaml", f"dictionary: d.yaml\ninsecure: true\ntokens:\n  - {admin}\n")
    assert load_yaml(good, CoordinatorConfig).tokens[0].site == "va"
