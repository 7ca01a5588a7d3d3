"""Per-user data: the SQL schema and store, items and their checks, naming, file ingest, consistency."""
