--# Routing corpus for pgreplica.sql.classify(), read by tests/test_sql_corpus.py.
--#
--# Format
--#   -- expect: <target> <reason>        header: target is replica or primary
--#   -- params: <JSON list or object>    optional, right after the header: the
--#                                       parameters of a statement with psycopg
--#                                       placeholders (%s, %(name)s)
--#   <statement>                         every line up to the next header
--#
--# The statement is the text between its header lines with leading and trailing
--# whitespace (blank lines included) removed. Nothing else is removed: a trailing
--# semicolon stays, and so do comments inside the statement, including lines that
--# start with "--" (they are SQL comments). Lines starting with "--#" are comments of
--# this file and are dropped wherever they are. A header with nothing under it is the
--# empty string.
--#
--# Every statement whose target is "replica" runs on a real hot standby in the tests
--# (against tests/data/routing_schema.sql, with search_path = routing, public) and must
--# succeed there; a sample of the
--# "primary" ones must fail there with a read-only or recovery error.

--# ====================================================================== plain reads
-- expect: replica select
SELECT 1

-- expect: replica select
select 1;

-- expect: replica select
SELECT * FROM t

-- expect: replica select
SELECT id, name FROM t WHERE x > 10 ORDER BY id DESC LIMIT 5 OFFSET 0

-- expect: replica select
TABLE t

-- expect: replica select
VALUES (1, 'a'), (2, 'b')

-- expect: replica select
SELECT count(*), max(x), string_agg(name, ',' ORDER BY name) FROM t

-- expect: replica select
SELECT name, row_number() OVER (PARTITION BY x % 2 ORDER BY id) FROM t

-- expect: replica select
SELECT x % 2 AS parity, count(*) FROM t GROUP BY 1 HAVING count(*) > 0

-- expect: replica select
SELECT id FROM t UNION ALL SELECT "select" FROM "update" EXCEPT SELECT 99 INTERSECT SELECT 1

-- expect: replica select
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10) SELECT sum(i) FROM n

-- expect: replica select
WITH recent AS MATERIALIZED (SELECT * FROM t WHERE created > now() - interval '1 day')
SELECT count(*) FROM recent

-- expect: replica select
SELECT t.id, l.n FROM t CROSS JOIN LATERAL (SELECT count(*) AS n FROM jobs WHERE jobs.id <= t.id) AS l

-- expect: replica select
SELECT payload ->> 'k', jsonb_build_object('id', id), tags && ARRAY['a'] FROM t

-- expect: replica select
SELECT * FROM generate_series(1, 3) AS g(i) JOIN t ON t.id = g.i

-- expect: replica select
SELECT now(), current_timestamp, current_user, current_database(), version()

-- expect: replica select
SELECT * FROM active_books

-- expect: replica select
SELECT author_id, books FROM author_stats ORDER BY author_id

-- expect: replica select
SELECT last_value, is_called FROM s

-- expect: replica select
SELECT pid, state FROM pg_stat_activity WHERE datname = current_database()

-- expect: replica select
SELECT EXISTS (SELECT 1 FROM t WHERE x = 10) AS found

-- expect: replica select
SELECT CASE WHEN x > 15 THEN 'big' ELSE 'small' END, coalesce(name, '?') FROM t

-- expect: replica select
SELECT date_trunc('day', created), extract(year FROM created) FROM t

-- expect: replica select
SELECT txid_current_snapshot(), pg_current_snapshot()

-- expect: replica select
SELECT current_setting('search_path'), pg_catalog.current_setting('TimeZone')

--# ======================================================= psycopg placeholders
-- expect: replica select
-- params: [1]
SELECT * FROM t WHERE id = %s

-- expect: replica select
-- params: {"id": 2, "name": "beta"}
SELECT * FROM t WHERE id = %(id)s OR name = %(name)s OR %(id)s = 0

-- expect: replica select
-- params: [[1, 2, 3]]
SELECT * FROM t WHERE id = ANY(%s)

-- expect: replica select
-- params: ["a"]
SELECT name FROM t WHERE name LIKE 'a%%' OR name = %s

-- expect: replica select
-- params: [5]
SELECT '100%%' AS pct, %s::int AS n

-- expect: primary write
-- params: [5, 1]
UPDATE t SET x = x + %s WHERE id = %s

--# ========================================================= tricky texts
-- expect: replica select
SELECT 10 % 3

-- expect: replica select
SELECT 'DELETE FROM t' AS s

-- expect: replica select
SELECT 'INSERT INTO t VALUES (1)', 'UPDATE t SET x = 1', 'SELECT 1 FOR UPDATE'

-- expect: replica select
/* INSERT INTO t VALUES (1) */ SELECT 1

-- expect: replica select
-- UPDATE t SET x = 1
SELECT 1

-- expect: replica select
SELECT 1 -- ; DELETE FROM t

-- expect: replica select
SELECT /* nested /* DROP TABLE t */ comment */ 1

-- expect: replica select
SELECT $$DROP TABLE t$$

-- expect: replica select
SELECT $body$ ; INSERT INTO t VALUES (1); $body$ AS text

-- expect: replica select
SELECT E'it\'s; DELETE FROM t; --' AS s

-- expect: replica select
SELECT U&'\0044ELETE' AS s

-- expect: replica select
SELECT "update" FROM t

-- expect: replica select
SELECT "select", "from", "nextval" FROM "update"

-- expect: replica select
SELECT nextval FROM t

-- expect: replica select
SELECT t.nextval + 1 AS n FROM t ORDER BY nextval

-- expect: replica select
SELECT id FROM t WHERE name = 'nextval(''s'')' OR name = 'pg_advisory_lock(1)'

-- expect: replica select
SELECT 1 AS "FOR UPDATE", 2 AS "INSERT"

-- expect: replica select
SELECT * FROM t WHERE name = '%s'

-- expect: replica select
SELECT 'txid_current()' AS "nextval()"

--# ====================================================== INSERT / UPDATE / DELETE / MERGE
-- expect: primary write
INSERT INTO t (id, x) VALUES (100, 1)

-- expect: primary write
insert into t values (101, 2)

-- expect: primary write
INSERT INTO t (id, name) VALUES (102, 'x') RETURNING id, created

-- expect: primary write
INSERT INTO items (sku, qty) VALUES ('C-3', 1) ON CONFLICT (sku) DO NOTHING

-- expect: primary write
INSERT INTO items (sku, qty) VALUES ('A-1', 1)
ON CONFLICT (sku) DO UPDATE SET qty = items.qty + EXCLUDED.qty RETURNING *

-- expect: primary write
INSERT INTO audit_log (msg) SELECT name FROM t WHERE x > 0

-- expect: primary write
INSERT INTO "update" ("select", "from") VALUES (3, 'three')

-- expect: primary write
INSERT INTO t (id) VALUES (nextval('s'))

-- expect: primary write
UPDATE t SET x = x + 1 WHERE id = 1

-- expect: primary write
UPDATE t SET name = i.sku FROM items i WHERE i.id = t.id RETURNING t.id, t.name

-- expect: primary write
DELETE FROM t WHERE id = 1

-- expect: primary write
DELETE FROM jobs USING t WHERE jobs.id = t.id AND t.x > 100 RETURNING jobs.*

-- expect: primary write
MERGE INTO t USING (VALUES (1, 2)) AS v(id, x) ON t.id = v.id
WHEN MATCHED THEN UPDATE SET x = v.x
WHEN NOT MATCHED THEN INSERT (id, x) VALUES (v.id, v.x)

-- expect: primary write
MERGE INTO items AS i USING (SELECT 'A-1' AS sku) AS s ON i.sku = s.sku
WHEN MATCHED AND i.qty = 0 THEN DELETE
WHEN MATCHED THEN DO NOTHING

-- expect: primary write
TRUNCATE t

-- expect: primary write
TRUNCATE TABLE jobs, audit_log RESTART IDENTITY CASCADE

--# ============================================================ writable CTEs
-- expect: primary writable_cte
WITH d AS (DELETE FROM jobs WHERE state = 'done' RETURNING id) SELECT count(*) FROM d

-- expect: primary writable_cte
WITH u AS (UPDATE t SET x = x + 1 WHERE id = 1 RETURNING *) SELECT * FROM u

-- expect: primary writable_cte
WITH i AS (INSERT INTO audit_log (msg) VALUES ('x') RETURNING id) SELECT id FROM i

-- expect: primary writable_cte
WITH r AS (SELECT 1 AS a), i AS (INSERT INTO audit_log (msg) VALUES ('y')) SELECT * FROM r

-- expect: primary writable_cte
WITH outer_cte AS (WITH inner_cte AS (DELETE FROM jobs RETURNING id) SELECT id FROM inner_cte)
SELECT * FROM outer_cte

-- expect: primary writable_cte
SELECT * FROM (WITH d AS (DELETE FROM jobs RETURNING id) SELECT id FROM d) AS sub

-- expect: primary writable_cte
SELECT id FROM t WHERE id IN (WITH u AS (UPDATE t SET x = 0 RETURNING id) SELECT id FROM u)

-- expect: primary writable_cte
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3),
     w AS (INSERT INTO audit_log (msg) SELECT i::text FROM n RETURNING id)
SELECT count(*) FROM w

-- expect: primary writable_cte
SELECT 1 UNION ALL (WITH d AS (DELETE FROM jobs RETURNING id) SELECT id FROM d)

-- expect: primary writable_cte
COPY (WITH d AS (DELETE FROM jobs WHERE id < 0 RETURNING id) SELECT id FROM d) TO STDOUT

-- expect: primary write
WITH c AS (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
UPDATE jobs SET state = 'running' FROM c WHERE jobs.id = c.id RETURNING jobs.id

--# =================================================== SELECT INTO / CREATE TABLE AS
-- expect: primary select_into
SELECT * INTO TEMP t_copy FROM t

-- expect: primary select_into
SELECT id, name INTO t_backup FROM t WHERE x > 10

-- expect: primary select_into
CREATE TABLE t_archive AS SELECT * FROM t WHERE x < 0

-- expect: primary select_into
CREATE TEMP TABLE IF NOT EXISTS tmp_ids AS SELECT id FROM t WITH NO DATA

-- expect: primary select_into
CREATE MATERIALIZED VIEW book_totals AS SELECT author_id, sum(price) FROM shop_book GROUP BY 1

--# ============================================================= row locking
-- expect: primary locking
SELECT * FROM t WHERE id = 1 FOR UPDATE

-- expect: primary locking
SELECT * FROM t WHERE id = 1 FOR NO KEY UPDATE

-- expect: primary locking
SELECT * FROM t WHERE id = 1 FOR SHARE

-- expect: primary locking
SELECT * FROM t WHERE id = 1 FOR KEY SHARE

-- expect: primary locking
SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED

-- expect: primary locking
SELECT * FROM t FOR UPDATE NOWAIT

-- expect: primary locking
SELECT t.id, i.sku FROM t JOIN items i ON i.id = t.id FOR UPDATE OF t FOR SHARE OF i

-- expect: primary locking
SELECT * FROM t WHERE id IN (SELECT id FROM t WHERE x > 0 FOR UPDATE)

-- expect: primary locking
SELECT * FROM (SELECT * FROM t FOR SHARE) AS locked

-- expect: primary locking
SELECT 1 WHERE EXISTS (SELECT 1 FROM t WHERE id = 1 FOR KEY SHARE)

-- expect: primary locking
WITH c AS (SELECT id FROM jobs LIMIT 1 FOR UPDATE) SELECT * FROM c

-- expect: primary locking
COPY (SELECT * FROM t FOR UPDATE) TO STDOUT

--# ================================================================== LOCK
-- expect: primary lock
LOCK TABLE t

-- expect: primary lock
LOCK t IN SHARE ROW EXCLUSIVE MODE NOWAIT

-- expect: primary lock
LOCK TABLE t IN ACCESS SHARE MODE

--# ================================================================== COPY
-- expect: primary copy_from
COPY t FROM STDIN

-- expect: primary copy_from
COPY t (id, x) FROM STDIN WITH (FORMAT csv, HEADER true)

-- expect: primary copy_from
COPY t FROM '/tmp/t.csv' WITH (FORMAT csv)

-- expect: primary copy_from
COPY audit_log (msg) FROM PROGRAM 'echo hello'

-- expect: replica copy_to
COPY t TO STDOUT

-- expect: replica copy_to
COPY t (id, name) TO STDOUT WITH (FORMAT csv, HEADER)

-- expect: replica copy_to
COPY (SELECT id, name FROM t WHERE x > 0 ORDER BY id) TO STDOUT

-- expect: replica copy_to
COPY (VALUES (1), (2)) TO STDOUT (FORMAT binary)

-- expect: replica copy_to
COPY (SELECT * FROM t) TO '/dev/null'

-- expect: replica copy_to
COPY (WITH c AS (SELECT count(*) FROM jobs) SELECT * FROM c) TO STDOUT

-- expect: replica copy_to
-- params: [2]
COPY (SELECT * FROM t WHERE id = %s) TO STDOUT

-- expect: primary write
COPY (INSERT INTO audit_log (msg) VALUES ('copy') RETURNING id) TO STDOUT

-- expect: primary sequence_function
COPY (SELECT nextval('s')) TO STDOUT

-- expect: primary unknown_function
COPY (SELECT log_event('copy')) TO STDOUT

--# ================================================================== CALL / DO
-- expect: primary call
CALL restock(1, 5)

-- expect: primary call
-- params: [2, 1]
CALL restock(%s, %s)

-- expect: primary do
DO $$BEGIN PERFORM 1; END$$

-- expect: primary do
DO LANGUAGE plpgsql $body$
BEGIN
  RAISE NOTICE 'hello';
END
$body$

--# ================================================================== EXPLAIN
-- expect: replica explain
EXPLAIN SELECT * FROM t

-- expect: replica explain
EXPLAIN (FORMAT JSON, COSTS off) SELECT * FROM t JOIN items USING (id)

-- expect: replica explain
EXPLAIN ANALYZE SELECT * FROM t

-- expect: replica explain
EXPLAIN (ANALYZE, BUFFERS, TIMING off) SELECT count(*) FROM shop_book

-- expect: replica explain
EXPLAIN INSERT INTO t (id) VALUES (200)

-- expect: replica explain
EXPLAIN UPDATE t SET x = 0

-- expect: replica explain
EXPLAIN (ANALYZE off) DELETE FROM t

-- expect: replica explain
EXPLAIN (ANALYZE false, VERBOSE) UPDATE t SET x = 1 WHERE id = 1

-- expect: replica explain
EXPLAIN SELECT nextval('s')

-- expect: replica explain
EXPLAIN SELECT * FROM t FOR UPDATE

-- expect: replica explain
EXPLAIN CREATE TABLE explained AS SELECT * FROM t

-- expect: primary explain_analyze_write
EXPLAIN ANALYZE INSERT INTO t (id) VALUES (201)

-- expect: primary explain_analyze_write
EXPLAIN (ANALYZE) DELETE FROM jobs

-- expect: primary explain_analyze_write
EXPLAIN (ANALYZE true, FORMAT yaml) UPDATE t SET x = 0

-- expect: primary explain_analyze_write
EXPLAIN ANALYZE SELECT nextval('s')

-- expect: primary explain_analyze_write
EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE

-- expect: primary explain_analyze_write
EXPLAIN ANALYZE WITH d AS (DELETE FROM jobs RETURNING id) SELECT * FROM d

-- expect: primary explain_analyze_write
EXPLAIN ANALYZE CREATE TABLE explained AS SELECT * FROM t

-- expect: primary unknown_function
EXPLAIN ANALYZE SELECT log_event('explain')

--# ======================================================= LISTEN / NOTIFY
-- expect: primary listen
LISTEN orders

-- expect: primary listen
UNLISTEN orders

-- expect: primary listen
UNLISTEN *

-- expect: primary notify
NOTIFY orders

-- expect: primary notify
NOTIFY orders, 'order 42 shipped'

-- expect: primary notify
SELECT pg_notify('orders', 'order 43')

--# ================================================= PREPARE / EXECUTE / DEALLOCATE
-- expect: replica prepare
PREPARE by_id (int) AS SELECT * FROM t WHERE id = $1

-- expect: primary write
PREPARE bump (int) AS UPDATE t SET x = x + 1 WHERE id = $1

-- expect: primary sequence_function
PREPARE next_id AS SELECT nextval('s')

-- expect: primary execute
EXECUTE by_id(1)

-- expect: primary deallocate
DEALLOCATE by_id

-- expect: primary deallocate
DEALLOCATE ALL

--# ========================================================== maintenance
-- expect: primary maintenance
REFRESH MATERIALIZED VIEW author_stats

-- expect: primary maintenance
REFRESH MATERIALIZED VIEW CONCURRENTLY author_stats

-- expect: primary maintenance
VACUUM

-- expect: primary maintenance
VACUUM (ANALYZE, VERBOSE) t

-- expect: primary maintenance
VACUUM FULL jobs

-- expect: primary maintenance
ANALYZE

-- expect: primary maintenance
ANALYZE t (x, name)

-- expect: primary maintenance
REINDEX TABLE t

-- expect: primary maintenance
CLUSTER t USING t_pkey

-- expect: primary maintenance
CHECKPOINT

--# ============================================================== sequences
-- expect: primary sequence_function
SELECT nextval('s')

-- expect: primary sequence_function
SELECT setval('s', 42)

-- expect: primary sequence_function
SELECT setval('s', 1, false)

-- expect: primary sequence_function
SELECT currval('s')

-- expect: primary sequence_function
SELECT lastval()

-- expect: primary sequence_function
SELECT pg_catalog.nextval('invoice_seq')

-- expect: primary sequence_function
SELECT "nextval"('s'::regclass)

-- expect: primary sequence_function
SELECT * FROM t WHERE id = nextval('s')

-- expect: primary sequence_function
SELECT id FROM t ORDER BY nextval('s')

-- expect: primary sequence_function
SELECT (SELECT nextval('s')) AS n

-- expect: primary sequence_function
SELECT id FROM t WHERE id IN (SELECT currval('s'))

-- expect: primary sequence_function
SELECT nextval('s') FROM generate_series(1, 3)

-- expect: primary sequence_function
SELECT * FROM nextval('s')

--# ========================================================= advisory locks
-- expect: primary advisory_lock
SELECT pg_advisory_lock(42)

-- expect: primary advisory_lock
-- params: [42]
SELECT pg_try_advisory_lock(%s)

-- expect: primary advisory_lock
SELECT pg_advisory_xact_lock(1, 2)

-- expect: primary advisory_lock
SELECT pg_try_advisory_xact_lock(hashtext('nightly-report'))

-- expect: primary advisory_lock
SELECT pg_advisory_lock_shared(7)

-- expect: primary advisory_lock
SELECT pg_advisory_unlock(42)

-- expect: primary advisory_lock
SELECT pg_advisory_unlock_all()

-- expect: primary advisory_lock
SELECT pg_catalog.pg_try_advisory_lock(1) AS got

--# ========================================================== transaction ids
-- expect: primary transaction_id
SELECT txid_current()

-- expect: primary transaction_id
SELECT pg_current_xact_id()

-- expect: primary transaction_id
SELECT txid_current_if_assigned()

-- expect: primary transaction_id
SELECT pg_current_xact_id_if_assigned()

-- expect: primary transaction_id
SELECT pg_export_snapshot()

--# ============================================================== set_config
-- expect: primary set_config
SELECT set_config('search_path', 'public', false)

-- expect: primary set_config
SELECT pg_catalog.set_config('statement_timeout', '5s', false)

-- expect: primary set_config
-- params: ["off"]
SELECT set_config('jit', %s, false)

-- expect: replica select
SELECT set_config('application_name', 'report', true)

-- expect: replica select
-- params: ["42"]
SELECT set_config('app.tenant', %s, true), current_setting('app.tenant')

--# ================================================== volatile built-ins: safe
-- expect: replica select
SELECT random()

-- expect: replica select
SELECT * FROM t ORDER BY random() LIMIT 1

-- expect: replica select
SELECT clock_timestamp(), timeofday()

-- expect: replica select
SELECT gen_random_uuid()

-- expect: replica select
SELECT pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(), pg_last_xact_replay_timestamp()

-- expect: replica select
SELECT pg_is_in_recovery()

-- expect: replica select
SELECT pg_sleep(0.01)

-- expect: replica select
SELECT pg_database_size(current_database()), pg_total_relation_size('t')

-- expect: replica select
SELECT setseed(0.5), random()

--# ================================================ volatile built-ins: unsafe
-- expect: primary volatile_function
SELECT lo_unlink(424242)

-- expect: primary volatile_function
SELECT lo_create(0)

-- expect: primary volatile_function
SELECT pg_create_restore_point('before-migration')

-- expect: primary volatile_function
SELECT pg_switch_wal()

-- expect: primary volatile_function
SELECT pg_current_wal_lsn()

-- expect: primary volatile_function
SELECT pg_reload_conf()

-- expect: primary volatile_function
SELECT query_to_xml('SELECT 1', true, false, '')

--# pg_walfile_name() is IMMUTABLE in pg_proc, yet it refuses to run during recovery
--# ("recovery is in progress"): it can only run on the primary.
-- expect: primary volatile_function
SELECT pg_walfile_name('0/3000000'::pg_lsn)

--# ========================================================== user functions
-- expect: primary unknown_function
SELECT log_event('hello')

-- expect: primary unknown_function
SELECT book_count()

-- expect: primary unknown_function
SELECT title, add_tax(price) FROM shop_book

-- expect: primary unknown_function
SELECT reporting.revenue()

-- expect: primary unknown_function
SELECT public.random()

-- expect: primary unknown_function
SELECT * FROM log_event('from clause')

-- expect: primary unknown_function
SELECT id FROM t WHERE add_tax(x) > 20

-- expect: primary unknown_function
SELECT uuid_generate_v4()

--# A quoted identifier keeps its case: "Random" is not the built-in random() but the
--# user function of the same name (which inserts a row).
-- expect: primary unknown_function
SELECT "Random"()

--# ====================================================== multi-statement strings
-- expect: replica select
SELECT 1; SELECT 2

-- expect: replica select
SELECT count(*) FROM t; SELECT count(*) FROM jobs;

-- expect: replica select
SHOW search_path; SELECT 1

-- expect: replica select
SET LOCAL statement_timeout = '5s'; SELECT count(*) FROM t

-- expect: replica select
EXPLAIN SELECT 1; SELECT 2

-- expect: replica select
PREPARE multi_p AS SELECT 1; EXPLAIN EXECUTE multi_p

-- expect: primary multi_statement
SELECT * FROM t; UPDATE t SET x = 1

-- expect: primary multi_statement
BEGIN; UPDATE t SET x = 2 WHERE id = 1; COMMIT

-- expect: primary multi_statement
SELECT 1; SELECT nextval('s')

-- expect: primary multi_statement
SELECT 1; SELECT 1 FROM t FOR UPDATE

-- expect: primary multi_statement
BEGIN READ ONLY; SELECT 1; COMMIT

-- expect: primary multi_statement
SELECT 1; CREATE TABLE multi_t (id int)

-- expect: primary unknown_function
SELECT log_event('a'); SELECT 1

-- expect: primary multi_statement
SELECT log_event('a'); DELETE FROM t

--# ================================================================ unparsable
-- expect: primary unparsable
SELEC 1

-- expect: primary unparsable
SELECT FROM WHERE

-- expect: primary unparsable
INSERT INTO

-- expect: primary unparsable
this is not SQL at all

-- expect: primary unparsable
SELECT 'unterminated

-- expect: primary unparsable
-- params: [1]
SELECT * FROM t WHERE id = %s AND

-- expect: primary unparsable
{"query": "SELECT 1"}

--# ==================================================================== empty
-- expect: replica empty

-- expect: replica empty
-- just a comment

-- expect: replica empty
/* a block comment; DELETE FROM t; */

-- expect: replica empty
;

-- expect: replica empty
; ;

--# ====================================================== transaction control
-- expect: primary transaction_control
BEGIN

-- expect: primary transaction_control
BEGIN READ ONLY

-- expect: primary transaction_control
BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE

-- expect: primary transaction_control
START TRANSACTION

-- expect: primary transaction_control
START TRANSACTION READ ONLY

-- expect: primary transaction_control
COMMIT

-- expect: primary transaction_control
END

-- expect: primary transaction_control
ROLLBACK

-- expect: primary transaction_control
ABORT

-- expect: primary transaction_control
COMMIT AND CHAIN

-- expect: primary transaction_control
SAVEPOINT before_import

-- expect: primary transaction_control
RELEASE SAVEPOINT before_import

-- expect: primary transaction_control
ROLLBACK TO SAVEPOINT before_import

-- expect: primary transaction_control
PREPARE TRANSACTION 'tx-1'

-- expect: primary transaction_control
COMMIT PREPARED 'tx-1'

-- expect: primary transaction_control
SET TRANSACTION READ ONLY

-- expect: primary transaction_control
SET TRANSACTION ISOLATION LEVEL SERIALIZABLE

--# SET LOCAL of the transaction's own settings is SET TRANSACTION in other words:
--# read-write mode and SERIALIZABLE cannot be set on a hot standby.
-- expect: primary transaction_control
SET LOCAL transaction_read_only = off

-- expect: primary transaction_control
SET LOCAL transaction_isolation TO 'serializable'

--# ============================================================ SET / SHOW
-- expect: primary session_set
SET search_path TO reporting, public

-- expect: primary session_set
SET TIME ZONE 'UTC'

-- expect: primary session_set
SET statement_timeout = 0

-- expect: primary session_set
SET SESSION work_mem = '64MB'

-- expect: primary session_set
RESET search_path

-- expect: primary session_set
RESET ALL

-- expect: primary session_set
SET ROLE NONE

-- expect: primary session_set
SET SESSION AUTHORIZATION DEFAULT

-- expect: primary session_set
SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY

-- expect: primary session_set
DISCARD ALL

-- expect: primary session_set
LOAD 'auto_explain'

-- expect: replica set_local
SET LOCAL statement_timeout = '5s'

-- expect: replica set_local
SET LOCAL search_path TO reporting, public

-- expect: replica set_local
SET LOCAL lock_timeout TO 100

-- expect: replica set_local
SET LOCAL transaction_read_only = on

-- expect: replica show
SHOW search_path

-- expect: replica show
SHOW ALL

-- expect: replica show
SHOW TRANSACTION ISOLATION LEVEL

-- expect: replica show
SHOW server_version

--# ================================================================ cursors
-- expect: replica cursor
DECLARE c CURSOR FOR SELECT * FROM t ORDER BY id

-- expect: replica cursor
DECLARE c_hold SCROLL CURSOR WITH HOLD FOR SELECT id, name FROM t

-- expect: primary locking
DECLARE c_lock CURSOR FOR SELECT * FROM t FOR UPDATE

-- expect: primary sequence_function
DECLARE c_seq CURSOR FOR SELECT nextval('s')

-- expect: primary unknown_function
DECLARE c_fn CURSOR FOR SELECT log_event('cursor')

-- expect: primary cursor
FETCH 10 FROM c

-- expect: primary cursor
FETCH NEXT IN c

-- expect: primary cursor
MOVE FORWARD 5 IN c

-- expect: primary cursor
CLOSE c

-- expect: primary cursor
CLOSE ALL

--# ==================================================================== DDL
-- expect: primary ddl
CREATE TABLE widgets (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL)

-- expect: primary ddl
CREATE TABLE IF NOT EXISTS widgets_copy (LIKE t INCLUDING ALL)

-- expect: primary ddl
CREATE TEMP TABLE scratch (id int)

-- expect: primary ddl
CREATE UNLOGGED TABLE cache_entries (k text PRIMARY KEY, v bytea)

-- expect: primary ddl
ALTER TABLE t ADD COLUMN IF NOT EXISTS note text

-- expect: primary ddl
ALTER TABLE t RENAME COLUMN name TO title

-- expect: primary ddl
DROP TABLE IF EXISTS widgets CASCADE

-- expect: primary ddl
CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x_idx ON t (x)

-- expect: primary ddl
CREATE UNIQUE INDEX t_name_idx ON t (lower(name)) WHERE name IS NOT NULL

-- expect: primary ddl
DROP INDEX IF EXISTS t_x_idx

-- expect: primary ddl
CREATE VIEW big_t AS SELECT * FROM t WHERE x > 100

-- expect: primary ddl
CREATE OR REPLACE VIEW active_books AS SELECT id, title FROM shop_book WHERE is_active

-- expect: primary ddl
DROP VIEW IF EXISTS big_t

-- expect: primary ddl
CREATE FUNCTION twice(i int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT i * 2 $$

-- expect: primary ddl
CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  NEW.created := now();
  RETURN NEW;
END
$fn$

-- expect: primary ddl
CREATE OR REPLACE PROCEDURE noop() LANGUAGE sql AS $$ SELECT 1 $$

-- expect: primary ddl
ALTER FUNCTION add_tax(numeric) STABLE

-- expect: primary ddl
DROP FUNCTION IF EXISTS twice(int)

-- expect: primary ddl
CREATE TRIGGER t_touch BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION touch()

-- expect: primary ddl
CREATE SEQUENCE IF NOT EXISTS ticket_seq START 100 INCREMENT 10

-- expect: primary ddl
ALTER SEQUENCE s RESTART WITH 1

-- expect: primary ddl
DROP SEQUENCE IF EXISTS ticket_seq

-- expect: primary ddl
CREATE SCHEMA IF NOT EXISTS archive

-- expect: primary ddl
DROP SCHEMA IF EXISTS archive CASCADE

-- expect: primary ddl
CREATE EXTENSION IF NOT EXISTS pgcrypto

-- expect: primary ddl
DROP EXTENSION IF EXISTS pgcrypto

-- expect: primary ddl
COMMENT ON TABLE t IS 'DELETE FROM t is not run here'

-- expect: primary ddl
COMMENT ON COLUMN t.nextval IS NULL

-- expect: primary ddl
GRANT SELECT ON t TO PUBLIC

-- expect: primary ddl
GRANT USAGE ON SCHEMA reporting TO PUBLIC

-- expect: primary ddl
REVOKE ALL ON t FROM PUBLIC

-- expect: primary ddl
ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO PUBLIC

-- expect: primary ddl
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')

-- expect: primary ddl
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0)

-- expect: primary ddl
CREATE ROLE reporting_reader NOLOGIN

-- expect: primary ddl
ALTER SYSTEM SET work_mem = '32MB'

-- expect: primary ddl
CREATE POLICY own_rows ON t USING (x > 0)

-- expect: primary ddl
SET CONSTRAINTS ALL DEFERRED

--# ===================================================== Django (psycopg backend)
-- expect: replica select
-- params: [true]
SELECT "shop_book"."id", "shop_book"."title", "shop_book"."author_id", "shop_book"."price", "shop_book"."stock", "shop_book"."published", "shop_book"."is_active" FROM "shop_book" WHERE "shop_book"."is_active" = %s ORDER BY "shop_book"."title" ASC LIMIT 21

-- expect: replica select
SELECT "shop_book"."id", "shop_book"."title", "shop_book"."author_id", "shop_book"."price", "shop_book"."stock", "shop_book"."published", "shop_book"."is_active" FROM "shop_book" WHERE "shop_book"."is_active" LIMIT 21

-- expect: replica select
-- params: [1]
SELECT "shop_book"."id", "shop_book"."title", "shop_book"."author_id", "shop_book"."price", "shop_book"."stock", "shop_book"."published", "shop_book"."is_active" FROM "shop_book" WHERE "shop_book"."id" = %s LIMIT 21

-- expect: replica select
-- params: [1]
SELECT (1) AS "a" FROM "shop_book" WHERE "shop_book"."author_id" = %s LIMIT 1

-- expect: replica select
-- params: [1]
SELECT 1 AS "a" FROM "shop_book" WHERE "shop_book"."author_id" = %s LIMIT 1

-- expect: replica select
-- params: [5]
SELECT COUNT(*) AS "__count" FROM "shop_book" WHERE "shop_book"."price" < %s

-- expect: replica select
SELECT SUM("shop_book"."price") AS "price__sum", AVG("shop_book"."stock") AS "stock__avg" FROM "shop_book"

-- expect: replica select
-- params: ["%small%"]
SELECT "shop_book"."id", "shop_book"."title" FROM "shop_book" WHERE UPPER("shop_book"."title"::text) LIKE UPPER(%s) ORDER BY "shop_book"."id" ASC

-- expect: replica select
-- params: [1]
SELECT "shop_book"."id", "shop_book"."title", "shop_book"."author_id", "shop_author"."id", "shop_author"."name", "shop_author"."email" FROM "shop_book" INNER JOIN "shop_author" ON ("shop_book"."author_id" = "shop_author"."id") WHERE "shop_book"."id" = %s LIMIT 21

-- expect: replica select
SELECT "shop_author"."id", "shop_author"."name", "shop_author"."email", COUNT("shop_book"."id") AS "num_books" FROM "shop_author" LEFT OUTER JOIN "shop_book" ON ("shop_author"."id" = "shop_book"."author_id") GROUP BY "shop_author"."id" ORDER BY "num_books" DESC

-- expect: replica select
-- params: [1, 2, 3]
SELECT "shop_book"."id", "shop_book"."title", "shop_book"."author_id" FROM "shop_book" WHERE "shop_book"."author_id" IN (%s, %s, %s)

-- expect: replica select
SELECT "shop_author"."id", "shop_author"."name" FROM "shop_author" WHERE EXISTS(SELECT 1 AS "a" FROM "shop_book" U1 WHERE (U1."stock" > 0 AND U1."author_id" = ("shop_author"."id")) LIMIT 1)

-- expect: replica select
SELECT DISTINCT "shop_book"."title" FROM "shop_book" ORDER BY "shop_book"."title" ASC

-- expect: replica select
SELECT "shop_book"."id", "shop_book"."title" FROM "shop_book" ORDER BY RANDOM() ASC

-- expect: replica select
SELECT "shop_book"."id" FROM "shop_book" WHERE "shop_book"."published" <= (STATEMENT_TIMESTAMP())::date ORDER BY "shop_book"."id" ASC LIMIT 1

-- expect: replica select
-- params: ["2000-01-01T00:00:00+00:00", "k5x8a0c1"]
SELECT "django_session"."session_key", "django_session"."session_data", "django_session"."expire_date" FROM "django_session" WHERE ("django_session"."expire_date" > %s::timestamptz AND "django_session"."session_key" = %s) LIMIT 21

-- expect: replica select
SELECT c.relname, CASE WHEN c.relispartition THEN 'p' WHEN c.relkind IN ('m', 'v') THEN 'v' ELSE 't' END, obj_description(c.oid, 'pg_class') FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v') AND n.nspname NOT IN ('pg_catalog', 'pg_toast') AND pg_catalog.pg_table_is_visible(c.oid)

-- expect: primary write
-- params: ["Mort", 2, "7.99", 4, "1987-11-12", true]
INSERT INTO "shop_book" ("title", "author_id", "price", "stock", "published", "is_active") VALUES (%s, %s, %s, %s, %s, %s) RETURNING "shop_book"."id"

-- expect: primary write
-- params: ["Small Gods", 2, "9.99", 0, null, true, 2]
UPDATE "shop_book" SET "title" = %s, "author_id" = %s, "price" = %s, "stock" = %s, "published" = %s, "is_active" = %s WHERE "shop_book"."id" = %s

-- expect: primary write
-- params: [1, 3]
UPDATE "shop_book" SET "stock" = ("shop_book"."stock" - %s) WHERE "shop_book"."id" = %s

-- expect: primary write
-- params: ["2024-01-01T00:00:00+00:00", 1]
UPDATE "auth_user" SET "last_login" = %s WHERE "auth_user"."id" = %s

-- expect: primary write
-- params: [99]
DELETE FROM "shop_book" WHERE "shop_book"."id" IN (%s)

-- expect: primary write
-- params: ["A", "a@example.com", "B", "b@example.com", "C", "c@example.com"]
INSERT INTO "shop_author" ("name", "email") VALUES (%s, %s), (%s, %s), (%s, %s) RETURNING "shop_author"."id"

-- expect: primary write
-- params: [["A", "B"], ["a@example.com", "b@example.com"]]
INSERT INTO "shop_author" ("name", "email") SELECT * FROM UNNEST((%s)::varchar(100)[], (%s)::varchar(254)[]) RETURNING "shop_author"."id"

-- expect: primary write
-- params: ["A-1", 3, "D-4", 1]
INSERT INTO "items" ("sku", "qty") VALUES (%s, %s), (%s, %s) ON CONFLICT DO NOTHING

-- expect: primary write
-- params: ["A-1", 3, "1.00"]
INSERT INTO "items" ("sku", "qty", "price") VALUES (%s, %s, %s) ON CONFLICT("sku") DO UPDATE SET "qty" = EXCLUDED."qty", "price" = EXCLUDED."price" RETURNING "items"."id"

-- expect: primary locking
-- params: [1]
SELECT "shop_book"."id", "shop_book"."title", "shop_book"."stock" FROM "shop_book" WHERE "shop_book"."id" = %s LIMIT 21 FOR UPDATE

-- expect: primary locking
-- params: [1]
SELECT "shop_book"."id", "shop_book"."stock", "shop_author"."id", "shop_author"."name" FROM "shop_book" INNER JOIN "shop_author" ON ("shop_book"."author_id" = "shop_author"."id") WHERE "shop_book"."id" = %s LIMIT 21 FOR NO KEY UPDATE OF "shop_book"

-- expect: primary locking
SELECT "shop_book"."id" FROM "shop_book" WHERE "shop_book"."stock" > 0 ORDER BY "shop_book"."id" ASC FOR UPDATE SKIP LOCKED

-- expect: primary locking
-- params: ["alice"]
SELECT "auth_user"."id", "auth_user"."username" FROM "auth_user" WHERE "auth_user"."username" = %s LIMIT 21 FOR UPDATE NOWAIT

-- expect: primary set_config
-- params: ["UTC"]
SELECT set_config('TimeZone', %s, false)

-- expect: primary transaction_control
SAVEPOINT "s140245683246912_x1"

-- expect: primary transaction_control
RELEASE SAVEPOINT "s140245683246912_x1"

-- expect: primary transaction_control
ROLLBACK TO SAVEPOINT "s140245683246912_x1"

--# ===================================================== SQLAlchemy 2 (psycopg)
-- expect: replica select
select pg_catalog.version()

-- expect: replica select
select current_schema()

-- expect: replica show
show standard_conforming_strings

-- expect: replica show
show transaction isolation level

-- expect: replica select
-- params: {"name_1": "spongebob"}
SELECT user_account.id, user_account.name, user_account.fullname
FROM user_account
WHERE user_account.name = %(name_1)s::VARCHAR

-- expect: replica select
-- params: {"pk_1": 1}
SELECT user_account.id AS user_account_id, user_account.name AS user_account_name, user_account.fullname AS user_account_fullname
FROM user_account
WHERE user_account.id = %(pk_1)s::INTEGER

-- expect: replica select
-- params: {"param_1": 10}
SELECT user_account.id, user_account.name, user_account.fullname
FROM user_account ORDER BY user_account.id
 LIMIT %(param_1)s

-- expect: replica select
-- params: {"param_1": 10, "param_2": 0}
SELECT address.id, address.email_address, address.user_id
FROM address ORDER BY address.id
 LIMIT %(param_1)s::INTEGER OFFSET %(param_2)s::INTEGER

-- expect: replica select
-- params: {"name_1": "s%"}
SELECT count(*) AS count_1
FROM (SELECT user_account.id AS user_account_id, user_account.name AS user_account_name, user_account.fullname AS user_account_fullname
FROM user_account
WHERE user_account.name LIKE %(name_1)s::VARCHAR) AS anon_1

-- expect: replica select
WITH anon_1 AS
(SELECT address.user_id AS user_id, count(address.id) AS count
FROM address GROUP BY address.user_id)
 SELECT user_account.name, anon_1.count
FROM user_account LEFT OUTER JOIN anon_1 ON user_account.id = anon_1.user_id

-- expect: replica select
-- params: {"param_1": 1}
SELECT address.id AS address_id, address.email_address AS address_email_address, address.user_id AS address_user_id
FROM address
WHERE %(param_1)s::INTEGER = address.user_id

-- expect: replica select
-- params: {"primary_keys_1": 1, "primary_keys_2": 2}
SELECT address.user_id AS address_user_id, address.id AS address_id, address.email_address AS address_email_address
FROM address
WHERE address.user_id IN (%(primary_keys_1)s::INTEGER, %(primary_keys_2)s::INTEGER)

-- expect: replica select
-- params: {"table_name": "user_account", "param_1": "r", "param_2": "p", "param_3": "f", "param_4": "v", "param_5": "m", "nspname_1": "pg_catalog"}
SELECT pg_catalog.pg_class.relname
FROM pg_catalog.pg_class JOIN pg_catalog.pg_namespace ON pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace
WHERE pg_catalog.pg_class.relname = %(table_name)s::VARCHAR AND pg_catalog.pg_class.relkind = ANY (ARRAY[%(param_1)s::VARCHAR, %(param_2)s::VARCHAR, %(param_3)s::VARCHAR, %(param_4)s::VARCHAR, %(param_5)s::VARCHAR]) AND pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) AND pg_catalog.pg_namespace.nspname != %(nspname_1)s::VARCHAR

-- expect: replica select
SELECT now() AS now_1, user_account.name FROM user_account

-- expect: primary write
-- params: {"name": "patrick", "fullname": "Patrick Star"}
INSERT INTO user_account (name, fullname) VALUES (%(name)s::VARCHAR, %(fullname)s::VARCHAR) RETURNING user_account.id

-- expect: primary write
-- params: {"email_address__0": "p@example.com", "user_id__0": 1, "email_address__1": "q@example.com", "user_id__1": 2}
INSERT INTO address (email_address, user_id) SELECT p0::VARCHAR, p1::INTEGER FROM (VALUES (%(email_address__0)s, %(user_id__0)s, 0), (%(email_address__1)s, %(user_id__1)s, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING address.id, address.id AS id__1

-- expect: primary write
-- params: {"fullname": "Sandy Cheeks", "user_account_id": 2}
UPDATE user_account SET fullname=%(fullname)s::VARCHAR WHERE user_account.id = %(user_account_id)s::INTEGER

-- expect: primary write
-- params: {"id": 99}
DELETE FROM address WHERE address.id = %(id)s::INTEGER

-- expect: primary write
-- params: {"name": "sandy", "fullname": "Sandy"}
INSERT INTO user_account (name, fullname) VALUES (%(name)s::VARCHAR, %(fullname)s::VARCHAR) ON CONFLICT (name) DO UPDATE SET fullname = excluded.fullname

-- expect: primary locking
-- params: {"id_1": 1}
SELECT user_account.id, user_account.name, user_account.fullname
FROM user_account
WHERE user_account.id = %(id_1)s::INTEGER FOR UPDATE

-- expect: primary locking
SELECT user_account.id, user_account.name
FROM user_account FOR UPDATE OF user_account SKIP LOCKED

-- expect: primary locking
SELECT address.id, address.user_id
FROM address FOR SHARE NOWAIT

-- expect: primary locking
SELECT address.id
FROM address FOR KEY SHARE

-- expect: primary writable_cte
-- params: {"fullname_1": "X"}
WITH anon_1 AS
(UPDATE user_account SET fullname=%(fullname_1)s::VARCHAR RETURNING user_account.id)
 SELECT anon_1.id
FROM anon_1

-- expect: primary sequence_function
SELECT nextval('invoice_seq') AS next_value_1

-- expect: replica explain
EXPLAIN (ANALYZE 0) DELETE FROM items WHERE false

-- expect: primary volatile_function
SELECT pg_stat_reset()

-- expect: primary set_config
SELECT set_config('transaction_read_only', 'off', true)

-- expect: replica set_local
SET LOCAL transaction_isolation TO 'repeatable read'
