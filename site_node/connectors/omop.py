"""The OMOP CDM adapter: one row per person from person, observation_period,
condition_occurrence, measurement, drug_exposure and death, by the concept ids a site lists.

The per-person reductions run in the database (SQL with bound concept ids, in the connector's
read-only session): the first observation start and last end, whether a person has a condition
or drug, a measurement's first, last or mean value. Only one row per person reaches the site.
The index date is the start of the person's first observation period; persons without an
observation period are left out (they have no index date).
"""

from __future__ import annotations

import functools
from collections.abc import Set
from typing import Any

import numpy as np
import pandas as pd

from protocol.config import DataSource, OmopVariable
from site_node.connectors.sql import reading
from site_node.mapping import DAYS_PER_YEAR, code_key, unmapped_code

#: the column holding OMOP's person_id in the frame (declare it as the dictionary's patient_id)
PERSON_ID = "person_id"

_EVENTS = {
    "condition": ("condition_occurrence", "condition_concept_id"),
    "drug": ("drug_exposure", "drug_concept_id"),
}


def _days(values: Any) -> pd.Series:
    return pd.to_datetime(pd.Series(values), errors="coerce")


class _Omop:
    def __init__(self, connection: Any, schema: str | None) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.connection = connection
        self.meta = sa.MetaData(schema=schema)
        self.tables: dict[str, Any] = {}

    def table(self, name: str) -> Any:
        if name not in self.tables:
            self.tables[name] = self.sa.Table(name, self.meta, autoload_with=self.connection)
        return self.tables[name]

    def frame(self, query: Any, columns: list[str]) -> pd.DataFrame:
        return pd.DataFrame(self.connection.execute(query).fetchall(), columns=columns)

    def persons(self) -> pd.DataFrame:
        """person_id, birth date, gender concept, index date and end of observation."""
        sa = self.sa
        person = self.table("person")
        period = self.table("observation_period")
        spans = (
            sa.select(
                period.c.person_id,
                sa.func.min(period.c.observation_period_start_date).label("start"),
                sa.func.max(period.c.observation_period_end_date).label("end"),
            )
            .group_by(period.c.person_id)
            .subquery()
        )
        query = sa.select(
            person.c.person_id,
            person.c.year_of_birth,
            person.c.month_of_birth,
            person.c.day_of_birth,
            person.c.gender_concept_id,
            spans.c.start,
            spans.c.end,
        ).join(spans, spans.c.person_id == person.c.person_id)
        columns = ["person_id", "year", "month", "day", "gender", "start", "end"]
        frame = self.frame(query.order_by(person.c.person_id), columns)
        birth = pd.to_datetime(
            {
                "year": frame["year"],
                "month": frame["month"].fillna(7),  # a missing month or day: mid-year
                "day": frame["day"].fillna(1),
            },
            errors="coerce",
        )
        frame["birth"] = birth
        frame["start"] = _days(frame["start"])
        frame["end"] = _days(frame["end"])
        return frame.set_index("person_id")

    def having(self, kind: str, concepts: list[int]) -> set[Any]:
        sa = self.sa
        name, column = _EVENTS[kind]
        table = self.table(name)
        query = sa.select(table.c.person_id).where(
            table.c[column].in_(sa.bindparam("concepts", expanding=True))
        )
        rows = self.connection.execute(query.distinct(), {"concepts": concepts}).fetchall()
        return {row[0] for row in rows}

    @functools.cached_property
    def deaths(self) -> pd.Series:
        sa = self.sa
        death = self.table("death")
        query = sa.select(death.c.person_id, sa.func.min(death.c.death_date)).group_by(
            death.c.person_id
        )
        frame = self.frame(query, ["person_id", "date"])
        return pd.Series(_days(frame["date"]).to_numpy(), index=frame["person_id"])

    def measurement(self, concepts: list[int], value: str) -> pd.Series:
        sa = self.sa
        m = self.table("measurement")
        chosen = m.c.measurement_concept_id.in_(sa.bindparam("concepts", expanding=True))
        present = m.c.value_as_number.is_not(None)
        if value == "mean":
            query = (
                sa.select(m.c.person_id, sa.func.avg(m.c.value_as_number))
                .where(chosen, present)
                .group_by(m.c.person_id)
            )
        else:
            date_order = m.c.measurement_date.desc() if value == "last" else m.c.measurement_date
            id_order = m.c.measurement_id.desc() if value == "last" else m.c.measurement_id
            ranked = (
                sa.select(
                    m.c.person_id,
                    m.c.value_as_number,
                    sa.func.row_number()
                    .over(partition_by=m.c.person_id, order_by=(date_order, id_order))
                    .label("rank"),
                )
                .where(chosen, present)
                .subquery()
            )
            query = sa.select(ranked.c.person_id, ranked.c.value_as_number).where(
                ranked.c.rank == 1
            )
        rows = self.connection.execute(query, {"concepts": concepts}).fetchall()
        return pd.Series({row[0]: float(row[1]) for row in rows}, dtype=np.float64)


def _variable(omop: _Omop, spec: OmopVariable, persons: pd.DataFrame) -> pd.Series:
    index = persons.index
    if spec.kind == "age":
        days = (persons["start"] - persons["birth"]).dt.days
        return days.astype(np.float64) / DAYS_PER_YEAR
    if spec.kind == "gender":
        codes = spec.codes or {}
        keys = persons["gender"].map(code_key, na_action="ignore")
        # A concept without a code (0: unknown) becomes text, which the check reports as a
        # value the dictionary does not allow; kept as 0 it would pass as a level.
        return keys.map(codes).astype(object).where(keys.isin(set(codes)), keys.map(unmapped_code))
    if spec.kind in _EVENTS:
        having = omop.having(spec.kind, spec.concepts)
        return pd.Series(index.isin(list(having)).astype(np.float64), index=index)
    if spec.kind == "measurement":
        return omop.measurement(spec.concepts, spec.value).reindex(index)
    died = omop.deaths.reindex(index)
    if spec.kind == "death":
        return died.notna().astype(np.float64)
    until = died.where(died.notna(), persons["end"])
    return (until - persons["start"]).dt.days.astype(np.float64)


def read_omop(source: DataSource, columns: Set[str] | None = None) -> pd.DataFrame:
    """One row per person with a column per configured variable (and ``person_id``).

    Raises:
        ConfigError: a table or column of the CDM cannot be read (the URL without password).
    """

    assert source.url is not None and source.omop is not None
    missing = "no table {table!r} (an OMOP CDM 5.x schema)"
    with reading(source.url, "the OMOP database", missing) as connection:
        omop = _Omop(connection, source.db_schema)
        persons = omop.persons()
        out = {PERSON_ID: persons.index.astype(str)}
        for name, spec in source.omop.variables.items():
            if columns is None or name in columns:
                out[name] = _variable(omop, spec, persons).to_numpy()
    return pd.DataFrame(out)
