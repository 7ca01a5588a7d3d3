"""adapter methods: which PEFT method each adapter and training job is (issue 15)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every adapter and job before this revision is LoRA
    for table in ("adapters", "training_jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("method", sa.String(length=32), server_default="lora", nullable=False))


def downgrade() -> None:
    for table in ("training_jobs", "adapters"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("method")
