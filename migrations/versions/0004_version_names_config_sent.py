"""pipeline versions have names; a job keeps its training_config as the client sent it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 07:00:00

Names as in Kubeflow: the first version of a pipeline is named after the pipeline (or "1" when the pipeline's name
is only digits, which later versions' numbers would repeat), later ones "2", "3", ... (existing rows get exactly
those; the rule is written out here, as it was when this migration was written, so that later code cannot
change what it does).
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def _batch(table):
    # On SQLite a batch operation may rebuild the table: it must keep AUTOINCREMENT (ids never reused, 0003).
    kwargs = {"sqlite_autoincrement": True} if op.get_bind().dialect.name == "sqlite" else {}
    return op.batch_alter_table(table, table_kwargs=kwargs)


def _default_name(pipeline_name, number):
    return pipeline_name if number == 1 and not pipeline_name.isdigit() else str(number)


def upgrade():
    with _batch('pipeline_versions') as batch:
        batch.add_column(sa.Column('name', sa.String(length=128), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT pipeline_versions.id, pipeline_versions.number, pipelines.name FROM pipeline_versions "
        "JOIN pipelines ON pipelines.id = pipeline_versions.pipeline_id")).all()
    for version_id, number, pipeline_name in rows:
        conn.execute(sa.text("UPDATE pipeline_versions SET name = :name WHERE id = :id"),
                     {"name": _default_name(pipeline_name, number), "id": version_id})
    with _batch('pipeline_versions') as batch:
        batch.alter_column('name', existing_type=sa.String(length=128), nullable=False)
        batch.create_unique_constraint('uq_pipeline_versions_pipeline_name', ['pipeline_id', 'name'])
    with _batch('training_jobs') as batch:
        batch.add_column(sa.Column('training_config_sent', sa.JSON(), nullable=True))


def downgrade():
    with _batch('training_jobs') as batch:
        batch.drop_column('training_config_sent')
    with _batch('pipeline_versions') as batch:
        batch.drop_constraint('uq_pipeline_versions_pipeline_name', type_='unique')
        batch.drop_column('name')
