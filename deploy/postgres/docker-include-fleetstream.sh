#!/bin/sh
# Mounted into the TimescaleDB container's /docker-entrypoint-initdb.d/ by
# deploy/docker-compose.yml; runs once, when the data volume is initialised.
# Makes the server read deploy/postgres/fleetstream.conf (mounted at
# /etc/postgresql/fleetstream.conf) after the image's own postgresql.conf. The
# compose file sets shared_preload_libraries (timescaledb, pg_stat_statements)
# and listen_addresses on the command line, which beats both files.
# No `set -e`/`set -u` here: the entrypoint sources non-executable scripts, and
# those options would leak into it.
echo "include '/etc/postgresql/fleetstream.conf'" >>"$PGDATA/postgresql.conf"
echo "fleetstream: $PGDATA/postgresql.conf now includes /etc/postgresql/fleetstream.conf"
