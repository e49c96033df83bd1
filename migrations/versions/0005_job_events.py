"""a job's events (its history) and its steps' times

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 15:30:00

Existing jobs keep no history (nothing recorded it); their event_count starts at 0.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def _batch(table):
    # On SQLite a batch operation may rebuild the table: it must keep AUTOINCREMENT (ids never reused, 0003).
    kwargs = {"sqlite_autoincrement": True} if op.get_bind().dialect.name == "sqlite" else {}
    return op.batch_alter_table(table, table_kwargs=kwargs)


def upgrade():
    op.create_table(
        'job_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('step', sa.String(length=40), nullable=True),
        sa.Column('from_state', sa.String(length=16), nullable=True),
        sa.Column('to_state', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('attempt', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'seq', name='uq_job_events_job_seq'),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f('ix_job_events_job_id'), 'job_events', ['job_id'], unique=False)
    with _batch('training_jobs') as batch:
        batch.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('step_times', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('event_count', sa.Integer(), server_default='0', nullable=False))


def downgrade():
    with _batch('training_jobs') as batch:
        batch.drop_column('event_count')
        batch.drop_column('step_times')
        batch.drop_column('started_at')
    op.drop_index(op.f('ix_job_events_job_id'), table_name='job_events')
    op.drop_table('job_events')
