"""SQLite state store: schema by migrations, WAL, synchronous=FULL. Never imports Textual."""
