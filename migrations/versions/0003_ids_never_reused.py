"""ids never reused (SQLite AUTOINCREMENT); a job's retry state while a step waits for a peer

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 06:10:00

On SQLite a plain INTEGER PRIMARY KEY hands the highest id out again once its row is deleted: a client holding a
deleted job's id would silently read the next job. AUTOINCREMENT never does; SQLite allows it only in CREATE TABLE,
so each table is rebuilt (rows, indexes and constraints kept; env.py turns foreign keys off around it). PostgreSQL's
sequences never go back: nothing to do there.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Parents before children.
TABLES = ("feature_groups", "models", "pipelines", "experiments", "pipeline_versions", "training_jobs",
          "work_items")


def upgrade():
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table in TABLES:
        if sqlite:
            with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}) as batch:
                if table == "training_jobs":
                    batch.add_column(sa.Column('waiting', sa.JSON(), nullable=True))
        elif table == "training_jobs":
            op.add_column('training_jobs', sa.Column('waiting', sa.JSON(), nullable=True))


def downgrade():
    # The rebuilt SQLite tables keep AUTOINCREMENT: never reusing ids is harmless to older code.
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table('training_jobs',
                              table_kwargs={"sqlite_autoincrement": True} if sqlite else {}) as batch:
        batch.drop_column('waiting')
