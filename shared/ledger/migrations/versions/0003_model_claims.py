"""model claims: the job publishing under a model name, held from before its import

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table (empty: a publish running during the upgrade claims on its retry)."""
    op.create_table(
        "model_claims",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.String(length=120), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_model_claims")),
    )


def downgrade() -> None:
    """Drop the table."""
    op.drop_table("model_claims")
