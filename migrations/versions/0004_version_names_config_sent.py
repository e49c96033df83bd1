"""pipeline versions have names; a job keeps its training_config as the client sent it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 07:00:00

Names as in Kubeflow: the first version of a pipeline is named after the pipeline, later ones "2", "3", ...
(existing rows get exactly those), or what the uploader chose.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('pipeline_versions') as batch:
        batch.add_column(sa.Column('name', sa.String(length=128), nullable=True))
    op.execute(
        "UPDATE pipeline_versions SET name = CASE WHEN number = 1 THEN "
        "(SELECT pipelines.name FROM pipelines WHERE pipelines.id = pipeline_versions.pipeline_id) "
        "ELSE CAST(number AS VARCHAR(16)) END"
    )
    with op.batch_alter_table('pipeline_versions') as batch:
        batch.alter_column('name', existing_type=sa.String(length=128), nullable=False)
        batch.create_unique_constraint('uq_pipeline_versions_pipeline_name', ['pipeline_id', 'name'])
    with op.batch_alter_table('training_jobs') as batch:
        batch.add_column(sa.Column('training_config_sent', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('training_jobs') as batch:
        batch.drop_column('training_config_sent')
    with op.batch_alter_table('pipeline_versions') as batch:
        batch.drop_constraint('uq_pipeline_versions_pipeline_name', type_='unique')
        batch.drop_column('name')
