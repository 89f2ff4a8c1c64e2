#!/bin/sh
# The least-privilege roles of the deployment guide (section 2), created when the
# postgres service initialises its data volume: the image runs every
# /docker-entrypoint-initdb.d/*.sh once, on an empty volume, as the superuser.
#
#   agents_owner  owns the tables; the migrate job connects as it
#   agents_app    row access only; what the application connects as
#
# The SQL is the package's own (`agents-sessions roles sql` renders the same file).
# Passwords come from the environment (AGENTS_OWNER_PASSWORD, AGENTS_APP_PASSWORD)
# through psql's \getenv, so they appear on no command line.
set -eu

LEAST_PRIVILEGE_SQL="${LEAST_PRIVILEGE_SQL:-/agents-sessions/least_privilege.sql}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner=agents_owner -v app=agents_app -v schema=public -v database="$POSTGRES_DB" \
    -v owner_login=true -v tables=conversations,append_keys,conversation_branches,messages,run_states,usage_logs \
    -f "$LEAST_PRIVILEGE_SQL"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv owner_password AGENTS_OWNER_PASSWORD
\getenv app_password AGENTS_APP_PASSWORD
ALTER ROLE agents_owner PASSWORD :'owner_password';
ALTER ROLE agents_app PASSWORD :'app_password';
SQL
