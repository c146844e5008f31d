"""Consent by purpose at the site: CSV, SQL and FHIR sources, opt-in and opt-out, no restart.

Cleveland's 303 records get patient ids P0000 .. P0302; the dictionary declares the id column,
which is never analysable. Counts are read as a researcher reads them (the coordinator's round
driver over the real site runtime, in sdc: exact).
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from protocol.config import DataDictionary, SiteConfig
from protocol.errors import ConfigError
from site_node.harmonize import conform, patient_ids
from site_node.runtime import SiteRuntime
from tests.attacks.harness import Refused, Researcher


@pytest.fixture
def cleveland(heart_frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    frame = heart_frames["cleveland"].copy()
    frame.insert(0, "pid", [f"P{i:04d}" for i in range(len(frame))])
    return frame


@pytest.fixture
def dictionary(heart_dict: DataDictionary) -> DataDictionary:
    return heart_dict.model_copy(update={"patient_id": "pid"})


def site(
    tmp_path: Path,
    frame: pd.DataFrame,
    dictionary: DataDictionary,
    consent: dict[str, Any] | None,
    rules: dict[str, str],
    mode: str = "sdc",
    duplicates: str = "refuse",
    purpose: str = "research",
) -> Researcher:
    config = SiteConfig.model_validate(
        {
            "name": "cleveland",
            "coordinator": "127.0.0.1:1",
            "dictionary": str(tmp_path / "dictionary.yaml"),
            "data": {"path": str(tmp_path / "data.csv"), "duplicate_patients": duplicates},
            "consent": consent,
            "state_dir": str(tmp_path / "state"),
            "insecure": True,
            "policy": {
                "allowed_analyses": ["count", "mean"],
                "consent": rules,
                "studies": [{"id": "s1", "mode": mode, "purpose": purpose}],
            },
        }
    )
    data, report = conform(frame, dictionary)
    runtime = SiteRuntime(config, dictionary, data, report, patient_ids(frame, dictionary))
    return Researcher({"cleveland": runtime}, dictionary, mode=mode)


def count(researcher: Researcher) -> float:
    result = researcher.run("count")
    assert not isinstance(result, Refused), result
    return float(result.count)  # type: ignore[union-attr]


def write_csv(path: Path, rows: list[tuple[str, str, str, str]], append: bool = False) -> None:
    with path.open("a" if append else "w", newline="") as handle:
        writer = csv.writer(handle)
        if not append:
            writer.writerow(["patient_id", "purpose", "status", "date"])
        writer.writerows(rows)


def grants(ids: list[str], purpose: str = "research") -> list[tuple[str, str, str, str]]:
    return [(pid, purpose, "granted", "2026-01-10") for pid in ids]


def test_opt_in_grants_of_250_give_exactly_250_and_10_withdrawals_take_10_without_restart(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    source = tmp_path / "consent.csv"
    ids = list(cleveland["pid"])
    write_csv(source, grants(ids[:250]) + grants(ids[250:], purpose="teaching"))
    r = site(tmp_path, cleveland, dictionary, {"kind": "csv", "path": str(source)},
             {"research": "opt-in"})  # fmt: skip
    assert count(r) == 250
    write_csv(source, [(pid, "research", "withdrawn", "2026-06-01") for pid in ids[:10]], True)
    assert count(r) == 240
    runtime = r.sites["cleveland"]
    audited = [json.loads(e.detail) for e in runtime.store.audit_entries()]
    excluded = [d["excluded"] for d in audited if "excluded" in d]
    assert excluded == [53, 63]  # the number excluded: in the site's audit log only
    replies = [e for e in runtime.store.audit_entries() if e.action == "reply"]
    assert all("excluded" not in e.detail for e in replies)


def test_an_earlier_grant_does_not_outlive_a_later_withdrawal_and_a_tie_is_a_withdrawal(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    source = tmp_path / "consent.csv"
    ids = list(cleveland["pid"])
    rows = [
        *grants(ids),
        (ids[0], "research", "withdrawn", "2025-01-01"),  # older than the grant: no effect
        (ids[1], "research", "withdrawn", "2026-01-10"),  # same day as the grant: withdrawn
        (ids[2], "research", "withdrawn", "2026-02-01"),
        (ids[2], "research", "granted", "2026-03-01"),  # granted again later: used
    ]
    write_csv(source, rows)
    r = site(tmp_path, cleveland, dictionary, {"kind": "csv", "path": str(source)},
             {"research": "opt-in"})  # fmt: skip
    assert count(r) == 302


def test_opt_out_excludes_only_withdrawals(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    source = tmp_path / "consent.csv"
    ids = list(cleveland["pid"])
    write_csv(source, [(pid, "research", "withdrawn", "2026-05-01") for pid in ids[:20]])
    r = site(tmp_path, cleveland, dictionary, {"kind": "csv", "path": str(source)},
             {"research": "opt-out"})  # fmt: skip
    assert count(r) == 283


def test_a_sql_consent_table_is_read_again_at_each_task(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    db = tmp_path / "consent.sqlite"
    ids = list(cleveland["pid"])
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE consent (patient_id, purpose, status, date)")
        connection.executemany("INSERT INTO consent VALUES (?, ?, ?, ?)", grants(ids[:250]))
    source = {"kind": "sql", "url": f"sqlite:///{db}"}
    r = site(tmp_path, cleveland, dictionary, source, {"research": "opt-in"})
    assert count(r) == 250
    with sqlite3.connect(db) as connection:
        withdrawals = [(pid, "research", "withdrawn", "2026-06-01") for pid in ids[:10]]
        connection.executemany("INSERT INTO consent VALUES (?, ?, ?, ?)", withdrawals)
    assert count(r) == 240


def fhir(pid: str, kind: str, when: str, status: str = "active") -> str:
    return json.dumps(
        {
            "resourceType": "Consent",
            "status": status,
            "patient": {"reference": f"Patient/{pid}"},
            "dateTime": when,
            "provision": {"type": kind, "purpose": [{"code": "research"}]},
        }
    )


def test_fhir_consent_resources_as_ndjson(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    source = tmp_path / "consent.ndjson"
    ids = list(cleveland["pid"])
    lines = [fhir(pid, "permit", "2026-01-10") for pid in ids[:250]]
    lines.append(fhir(ids[0], "deny", "2026-02-01"))  # a later denial
    lines.append(fhir(ids[1], "permit", "2026-03-01", status="inactive"))  # inactive: withdrawn
    lines.append(fhir(ids[260], "permit", "2026-03-01", status="entered-in-error"))  # ignored
    source.write_text("\n".join(lines) + "\n")
    r = site(tmp_path, cleveland, dictionary, {"kind": "fhir", "path": str(source)},
             {"research": "opt-in"})  # fmt: skip
    assert count(r) == 248


def test_a_purpose_without_a_rule_is_refused_while_a_source_is_configured(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    source = tmp_path / "consent.csv"
    write_csv(source, grants(list(cleveland["pid"])))
    r = site(tmp_path, cleveland, dictionary, {"kind": "csv", "path": str(source)},
             {"research": "opt-in"}, purpose="marketing")  # fmt: skip
    outcome = r.run("count")
    assert isinstance(outcome, Refused)
    assert "no consent rule for purpose 'marketing'" in outcome.reasons["cleveland"]


def test_a_malformed_consent_line_is_named_in_the_site_log_only(
    tmp_path: Path,
    cleveland: pd.DataFrame,
    dictionary: DataDictionary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A shifted line puts a patient id where the status belongs. Before, the refusal (sent to
    # the coordinator) and the audit entry quoted the value: "status 'P0042' is not allowed".
    source = tmp_path / "consent.csv"
    write_csv(source, [("P0000", "research", "granted", "2026-01-10"),
                       ("research", "P0042", "P0042", "2026-01-10")])  # fmt: skip
    r = site(tmp_path, cleveland, dictionary, {"kind": "csv", "path": str(source)},
             {"research": "opt-in"})  # fmt: skip
    outcome = r.run("count")
    assert isinstance(outcome, Refused)
    reason = outcome.reasons["cleveland"]
    assert "cannot apply its consent source" in reason and "site's log" in reason
    assert "P0042" not in reason and "line" not in reason
    audit = json.dumps([e.detail for e in r.sites["cleveland"].store.audit_entries()])
    assert "cannot apply its consent source" in audit and "P0042" not in audit
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any(f"{source}, line 3: status 'P0042' is not allowed" in m for m in logged), logged


def test_the_patient_id_is_never_analysable(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    r = site(tmp_path, cleveland, dictionary, None, {})
    assert "pid" not in r.sites["cleveland"].data.columns
    with pytest.raises(Exception, match="not in the data dictionary"):
        r.run("mean", variable="pid")


def test_several_rows_for_one_patient_refuse_dp_without_a_count_or_collapse_by_rule(
    tmp_path: Path, cleveland: pd.DataFrame, dictionary: DataDictionary
) -> None:
    doubled = cleveland.copy()
    doubled.loc[5:9, "pid"] = "P0000"  # five more rows of P0000
    r = site(tmp_path / "dp", doubled, dictionary, None, {}, mode="dp")
    outcome = r.run("count", epsilon=0.5)
    assert isinstance(outcome, Refused)
    reason = outcome.reasons["cleveland"]
    assert "several rows for some patient ids" in reason and "duplicate_patients" in reason
    assert not any(ch.isdigit() for ch in reason)
    for rule in ("first", "last"):
        collapsed = site(tmp_path / rule, doubled, dictionary, None, {}, duplicates=rule)
        assert count(collapsed) == 298
    kept = site(tmp_path / "last2", doubled, dictionary, None, {}, duplicates="last")
    ages = kept.sites["cleveland"].data["age"]
    assert ages.iloc[0] == cleveland["age"].iloc[1]  # P0000's first rows went, its last stayed


def test_opt_in_without_a_source_and_a_source_without_patient_ids_are_config_errors(
    tmp_path: Path, cleveland: pd.DataFrame, heart_dict: DataDictionary
) -> None:
    with pytest.raises(Exception, match="no consent source is configured"):
        SiteConfig.model_validate(
            {
                "name": "x",
                "coordinator": "h:1",
                "dictionary": "d.yaml",
                "data": {"path": "d.csv"},
                "insecure": True,
                "policy": {"consent": {"research": "opt-in"}},
            }
        )
    with pytest.raises(ConfigError, match="declares no patient_id column"):
        site(tmp_path, cleveland, heart_dict, {"kind": "csv", "path": "c.csv"},
             {"research": "opt-in"})  # fmt: skip
