-- Objects whose routing only the catalog can tell: views, user operators, functions
-- and unlogged tables (tests/test_catalog_routing.py). Loaded on the primary, then
-- replayed by the replicas; idempotent.
CREATE SCHEMA IF NOT EXISTS cat;
SET search_path TO cat, public;

CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, v text NOT NULL DEFAULT '');
CREATE UNLOGGED TABLE IF NOT EXISTS scratch (v text);
CREATE SEQUENCE IF NOT EXISTS ticket;
CREATE MATERIALIZED VIEW IF NOT EXISTS item_counts AS SELECT count(*) AS n FROM items;

-- Views that do what their definition does.
CREATE OR REPLACE VIEW plain AS SELECT id, v FROM items;
CREATE OR REPLACE VIEW over_plain AS SELECT id FROM plain;
CREATE OR REPLACE VIEW locked AS SELECT id, v FROM items FOR UPDATE;
CREATE OR REPLACE VIEW next_ticket AS SELECT nextval('ticket') AS n;
CREATE OR REPLACE VIEW over_next AS SELECT n FROM next_ticket;
CREATE OR REPLACE VIEW over_scratch AS SELECT v FROM scratch;
CREATE OR REPLACE VIEW locking_view AS SELECT pg_try_advisory_lock(4242) AS locked;

-- Functions behind operators.
CREATE OR REPLACE FUNCTION add_one(int, int) RETURNS int LANGUAGE sql IMMUTABLE
    AS $$ SELECT $1 + $2 + 1 $$;
CREATE OR REPLACE FUNCTION insert_pair(int, int) RETURNS int LANGUAGE plpgsql VOLATILE
    AS $$ BEGIN INSERT INTO cat.items (v) VALUES ($1 || ',' || $2); RETURN 1; END $$;
CREATE OR REPLACE FUNCTION lock_pair(int, int) RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ SELECT pg_try_advisory_lock($1, $2) $$;
CREATE OR REPLACE FUNCTION lock_key(bigint) RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ SELECT pg_try_advisory_lock($1) $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_operator WHERE oprname = '<+>') THEN
        CREATE OPERATOR cat.<+> (LEFTARG = int, RIGHTARG = int, FUNCTION = cat.add_one);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_operator WHERE oprname = '#!#') THEN
        CREATE OPERATOR cat.#!# (LEFTARG = int, RIGHTARG = int, FUNCTION = cat.insert_pair);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
                   WHERE oprname = '@@@' AND n.nspname = 'cat') THEN
        CREATE OPERATOR cat.@@@ (LEFTARG = int, RIGHTARG = int, FUNCTION = cat.lock_pair);
    END IF;
END $$;
