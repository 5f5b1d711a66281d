"""jobs detail and progress

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # `detail`: why a state was reached when the reason alone does not say it (a deadline that
    # passed while the server was unreachable). `progress_*`: the last `progress` event.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("detail", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("progress_node", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("progress_value", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("progress_max", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("progress_at")
        batch_op.drop_column("progress_max")
        batch_op.drop_column("progress_value")
        batch_op.drop_column("progress_node")
        batch_op.drop_column("detail")
