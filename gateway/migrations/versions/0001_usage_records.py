"""The usage ledger: one row per finished request.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("team", sa.String(64)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("served_by", sa.String(200)),
        sa.Column("adapter", sa.String(200)),
        sa.Column("variant", sa.String(200)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cached", sa.Boolean, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("cost", sa.Float, nullable=False),
    )
    op.create_index("ix_usage_records_ts", "usage_records", ["ts"])
    op.create_index("ix_usage_records_day", "usage_records", ["day"])
    op.create_index("ix_usage_records_key_id", "usage_records", ["key_id"])


def downgrade() -> None:
    op.drop_table("usage_records")
