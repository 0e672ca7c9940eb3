"""status counts: jobs by status, kept with every status change (/metrics reads them)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table and fill it from the jobs there are."""
    counts = op.create_table(
        "status_counts",
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("status", name=op.f("pk_status_counts")),
    )
    jobs = sa.table("jobs", sa.column("status", sa.String))
    op.execute(
        counts.insert().from_select(
            ["status", "jobs"], sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
        )
    )


def downgrade() -> None:
    """Drop the table (the counts can be had by counting jobs)."""
    op.drop_table("status_counts")
