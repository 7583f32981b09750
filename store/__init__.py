"""The SQLite store: schema, migrations, writers and the queries the screens read."""
