-- agents_sessions: least-privilege roles for one database.
--
-- Two roles:
--   owner  owns the schema objects and runs the migrations (`agents-sessions migrate
--          upgrade` / `alembic upgrade head` connect as this role);
--   app    what the application servers connect as: it reads and writes rows of the
--          agents_sessions tables and reads alembic_version, nothing else. It cannot
--          DROP, ALTER or TRUNCATE a table, nor CREATE anything in the schema.
--
-- No passwords here (scripts end up in shell history, CI logs and backups). Set them
-- afterwards, as the administrator:  \password agents_owner   (psql, sends a hash)
-- or  ALTER ROLE agents_app PASSWORD '...';  -- or use your platform's IAM auth.
--
-- Run it as a superuser (or, on a managed service, the administrator role that is a
-- member of both roles) while connected to the target database. It is idempotent:
-- run it again after upgrading agents_sessions and it re-applies ownership and
-- grants to every table of the package, so it also hands over a database that an
-- administrator migrated before the roles existed.
--
-- Parameters are psql variables, substituted exactly as psql does (:"name" is a
-- quoted identifier, :'name' a quoted literal). Render it with
--     agents-sessions roles sql --owner agents_owner --app agents_app
-- or run the file itself with
--     psql -v owner=agents_owner -v app=agents_app -v schema=public -v database=
--          -v owner_login=true -v tables=conversations,messages,usage_logs -f least_privilege.sql
--   owner, app     role names (created when missing, as LOGIN roles without password;
--                  owner_login=false creates the owner NOLOGIN, for deployers that
--                  connect as themselves with `options=-c role=<owner>`)
--   schema         the schema holding the tables (created, owned by owner, if missing)
--   database       the database these grants are for; the script refuses to run in any
--                  other ('' means whatever database it is connected to)
--   tables         the package's tables, comma-separated

BEGIN;

-- DO blocks are dollar-quoted, and psql does not substitute variables inside quotes:
-- the parameters reach them as transaction-local settings instead.
SET LOCAL agents_sessions.owner = :'owner';
SET LOCAL agents_sessions.app = :'app';
SET LOCAL agents_sessions.schema = :'schema';
SET LOCAL agents_sessions.database = :'database';
SET LOCAL agents_sessions.owner_login = :'owner_login';
SET LOCAL agents_sessions.tables = :'tables';

-- 1. Safety checks, then the roles.
DO $agents_sessions$
DECLARE
    owner_name text := current_setting('agents_sessions.owner');
    app_name text := current_setting('agents_sessions.app');
    wanted_database text := current_setting('agents_sessions.database');
BEGIN
    IF wanted_database <> '' AND wanted_database <> current_database() THEN
        RAISE EXCEPTION 'these grants are for database %, but this session is connected to %',
            quote_ident(wanted_database), quote_ident(current_database())
            USING HINT = 'connect to ' || quote_ident(wanted_database) || ' and run it again';
    END IF;
    IF owner_name = app_name THEN
        RAISE EXCEPTION 'the owner and the application role must be two different roles';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = owner_name) THEN
        EXECUTE format(
            'CREATE ROLE %I %s',
            owner_name,
            CASE WHEN current_setting('agents_sessions.owner_login')::boolean
                 THEN 'LOGIN' ELSE 'NOLOGIN' END
        );
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = app_name) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', app_name);
    END IF;
    -- Grants cannot restrict a role that bypasses them.
    IF EXISTS (
        SELECT FROM pg_catalog.pg_roles
        WHERE rolname = app_name AND (rolsuper OR rolbypassrls OR rolcreaterole OR rolcreatedb)
    ) THEN
        RAISE EXCEPTION 'role % is a superuser or has CREATEROLE, CREATEDB or BYPASSRLS: the application role must not', quote_ident(app_name);
    END IF;
    IF pg_catalog.pg_has_role(app_name, owner_name, 'USAGE') THEN
        RAISE EXCEPTION 'role % is a member of %, so it would own the tables too: the application role must not be', quote_ident(app_name), quote_ident(owner_name);
    END IF;
END
$agents_sessions$;

-- 2. The database: both roles may connect. The search_path makes the unqualified table
-- names of the package (and of Alembic) resolve to the schema. The application's
-- guarantees rely on READ COMMITTED; the package sets it on each new connection, but
-- behind PgBouncer in transaction mode that SET reaches one server connection only,
-- so the role's own default says it too.
DO $agents_sessions$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY[
        current_setting('agents_sessions.owner'), current_setting('agents_sessions.app')
    ] LOOP
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), role_name);
        EXECUTE format(
            'ALTER ROLE %I IN DATABASE %I SET search_path = %I',
            role_name, current_database(), current_setting('agents_sessions.schema')
        );
    END LOOP;
    EXECUTE format(
        'ALTER ROLE %I IN DATABASE %I SET default_transaction_isolation = %L',
        current_setting('agents_sessions.app'), current_database(), 'read committed'
    );
END
$agents_sessions$;

-- 3. The schema: the owner creates in it, the application only looks up names.
-- Revoking CREATE from PUBLIC is PostgreSQL's "secure schema usage pattern" (and the
-- default for `public` since PostgreSQL 15): no other role can plant objects here.
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"owner";
REVOKE CREATE ON SCHEMA :"schema" FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA :"schema" TO :"owner";
REVOKE CREATE ON SCHEMA :"schema" FROM :"app";
GRANT USAGE ON SCHEMA :"schema" TO :"app";

-- 4. Alembic's version table, created here (with Alembic's own definition) so that the
-- owner owns it and the application can only read it: the default privileges below
-- would otherwise let the application rewrite the schema version. Servers read it to
-- refuse to start behind head (AGENTS_SESSIONS_AUTO_MIGRATE=false).
CREATE TABLE IF NOT EXISTS :"schema".alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
ALTER TABLE :"schema".alembic_version OWNER TO :"owner";
REVOKE ALL ON TABLE :"schema".alembic_version FROM :"app";
GRANT SELECT ON TABLE :"schema".alembic_version TO :"app";

-- 5. Tables that exist already (a database migrated before this script ran, or a re-run
-- after an upgrade): the owner takes them over, the application gets row access only.
-- Identity columns draw from their sequence without any privilege on it, so the
-- application needs none on sequences.
DO $agents_sessions$
DECLARE
    schema_name text := current_setting('agents_sessions.schema');
    table_name text;
BEGIN
    FOR table_name IN
        SELECT c.relname
        FROM pg_catalog.pg_class AS c
        JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = schema_name
          AND c.relkind IN ('r', 'p')
          AND c.relname = ANY (string_to_array(current_setting('agents_sessions.tables'), ','))
    LOOP
        EXECUTE format(
            'ALTER TABLE %I.%I OWNER TO %I',
            schema_name, table_name, current_setting('agents_sessions.owner')
        );
        EXECUTE format(
            'REVOKE ALL ON TABLE %I.%I FROM %I',
            schema_name, table_name, current_setting('agents_sessions.app')
        );
        EXECUTE format(
            'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %I.%I TO %I',
            schema_name, table_name, current_setting('agents_sessions.app')
        );
    END LOOP;
END
$agents_sessions$;

-- 6. Tables that future migrations create (run as the owner): the same row access,
-- granted automatically when each table is created.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";

COMMIT;
