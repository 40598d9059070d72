"""The usage ledger: one record per charged response, on SQLite or PostgreSQL.

maas-ratelimit writes it (maas_ratelimit.usage_ledger: a local journal first, then batches to the
database); maas-authz reads it for the operator API (`GET /admin/v1/usage`). Both use what is
here: the record (records.py), the databases with their schema and migrations (database.py,
migrations/), and the queries (queries.py).
"""
