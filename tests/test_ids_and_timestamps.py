"""Ids are never handed out twice, and every timestamp is UTC with its offset, on SQLite as on PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timezone

from flask_migrate import upgrade as alembic_upgrade
from sqlalchemy import text

from tests.factories import FG_V1, create_feature_group
from tests.test_training_lifecycle import JOBS, job_request, setup  # noqa: F401
from trainingmgr import create_app
from trainingmgr.config import Settings
from trainingmgr.extensions import db
from trainingmgr.models import Base, TrainingJob, WorkItem
from trainingmgr.schema import enable_migrations


def test_a_deleted_jobs_id_is_never_given_to_the_next_job(setup):
    client = setup
    ids = [client.post(JOBS, json=job_request(f"m{i}")).get_json()["id"] for i in range(3)]
    assert client.delete(f"{JOBS}/{ids[-1]}").status_code in (200, 204)
    again = client.post(JOBS, json=job_request("m_next")).get_json()["id"]
    assert again > ids[-1]
    # The client holding the deleted id reads "not found", never somebody else's job.
    assert client.get(f"{JOBS}/{ids[-1]}").status_code == 404


def test_a_deleted_feature_groups_id_is_not_reused(client, app):
    create_feature_group(client, "first_fg")
    create_feature_group(client, "second_fg")
    with app.app_context():
        before = db.session.execute(text("SELECT max(id) FROM feature_groups")).scalar_one()
    assert client.delete(FG_V1, json={"featuregroups_list": [{"featureGroup_name": "second_fg"}]}).status_code == 200
    create_feature_group(client, "third_fg")
    with app.app_context():
        after = db.session.execute(text("SELECT max(id) FROM feature_groups")).scalar_one()
    assert after > before


def test_timestamps_are_utc_with_an_offset_in_responses_and_rows(setup, app):
    client = setup
    job = client.post(JOBS, json=job_request()).get_json()
    for field in ("created_at", "updated_at"):
        moment = datetime.fromisoformat(job[field])
        assert moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0, job[field]
    read = client.get(f"{JOBS}/{job['id']}").get_json()
    assert read["created_at"] == job["created_at"] and read["created_at"].endswith("+00:00")
    for pipeline in client.get("/pipelines").get_json().get("pipelines", []) or []:
        assert pipeline["created_at"].endswith("Z")
    with app.app_context():
        row = db.session.get(TrainingJob, job["id"])
        item = db.session.query(WorkItem).filter_by(job_id=job["id"]).first()
        for value in (row.created_at, row.updated_at, item.due_at, item.deadline_at):
            assert value.tzinfo is not None and value.utcoffset().total_seconds() == 0
        assert abs((datetime.now(timezone.utc) - row.created_at).total_seconds()) < 300


def test_the_sqlite_migration_keeps_rows_and_references(tmp_path):
    """0003 rebuilds every SQLite table (AUTOINCREMENT exists only in CREATE TABLE): rows, the work items of jobs
    (ON DELETE CASCADE must not fire) and foreign keys survive, and the old highest id is not handed out again."""
    settings = Settings(data_dir=str(tmp_path), secret_key="k", log_level="WARNING")
    app = create_app(settings)
    enable_migrations(app)
    with app.app_context():
        alembic_upgrade(revision="0002")
        with db.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO feature_groups (id, name, feature_list, datalake_source, host, port, bucket,"
                " token_encrypted, db_org, measurement, enable_dme, created_at, updated_at) VALUES"
                " (7, 'fg', 'a', 'CsvSource', '', '', '', '', '', 'x.csv', 0, '2026-01-01 00:00:00',"
                " '2026-01-01 00:00:00')")
            conn.exec_driver_sql(
                "INSERT INTO models (id, modelname, modelversion, training_count, created_at, updated_at)"
                " VALUES (3, 'm', '1', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
            conn.exec_driver_sql(
                "INSERT INTO training_jobs (id, model_id, feature_group_id, artifact_version, is_retraining,"
                " training_config, steps_state, status, deletion_in_progress, created_at, updated_at) VALUES"
                " (5, 3, 7, '1.0.0', 0, '{}', '{}', 'NOT_STARTED', 0, '2026-01-01 00:00:00',"
                " '2026-01-01 00:00:00')")
            conn.exec_driver_sql(
                "INSERT INTO work_items (id, job_id, kind, payload, due_at, attempts, created_at) VALUES"
                " (11, 5, 'extract', '{}', '2026-01-01 00:00:00', 0, '2026-01-01 00:00:00')")
            # Pipelines, one named by digits only: 0004 names their versions without a clash.
            for pipeline_id, name in ((1, "qoe"), (2, "2")):
                conn.exec_driver_sql(
                    "INSERT INTO pipelines (id, name, created_at, updated_at) VALUES"
                    f" ({pipeline_id}, '{name}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
                for number in (1, 2):
                    conn.exec_driver_sql(
                        "INSERT INTO pipeline_versions (pipeline_id, number, file_path, sha256, created_at,"
                        f" updated_at) VALUES ({pipeline_id}, {number}, 'p.yaml', 'x', '2026-01-01 00:00:00',"
                        " '2026-01-01 00:00:00')")
        alembic_upgrade()
        with db.engine.begin() as conn:
            assert conn.exec_driver_sql("SELECT id FROM training_jobs").scalars().all() == [5]
            assert conn.exec_driver_sql("SELECT job_id FROM work_items").scalars().all() == [5]
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            conn.exec_driver_sql("DELETE FROM training_jobs WHERE id = 5")  # cascades to its work item
            assert conn.exec_driver_sql("SELECT count(*) FROM work_items").scalar() == 0
            conn.exec_driver_sql(
                "INSERT INTO training_jobs (model_id, feature_group_id, artifact_version, is_retraining,"
                " training_config, steps_state, status, deletion_in_progress, created_at, updated_at) VALUES"
                " (3, 7, '1.1.0', 0, '{}', '{}', 'NOT_STARTED', 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
            assert conn.exec_driver_sql("SELECT id FROM training_jobs").scalars().all() == [6]
            assert conn.exec_driver_sql(
                "SELECT name FROM pipeline_versions ORDER BY pipeline_id, number").scalars().all() == [
                "qoe", "2", "1", "2"]
        row = db.session.get(TrainingJob, 6)
        assert row.created_at == datetime(2026, 1, 1, tzinfo=timezone.utc)
        db.engine.dispose()


def test_every_table_keeps_autoincrement_at_the_newest_revision(app, sqlite_only):
    """Later migrations rebuild SQLite tables (batch mode): each must keep AUTOINCREMENT. (A table keyed by
    another's id, as job_logs by its job's, hands out no ids of its own.)"""
    with app.app_context():
        tables = {name: sql for name, sql in db.session.execute(text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name != 'alembic_version'"))}
    assert set(tables) == {t.name for t in Base.metadata.sorted_tables}
    keyed_by_another = {t.name for t in Base.metadata.sorted_tables
                        if all(column.foreign_keys for column in t.primary_key.columns)}
    assert keyed_by_another == {"job_logs"}
    assert [name for name, sql in tables.items() if "AUTOINCREMENT" not in sql and name not in keyed_by_another] == []
