--# Statements the static classifier sends to a replica and only the catalog can place
--# (tests/test_catalog_routing.py, schema tests/data/catalog_schema.sql, search_path
--# cat, public). Format as in routing_corpus.sql: "-- expect: <target> <reason>".
--# Every replica entry must run on a hot standby; every primary entry must fail there
--# or take a lock there.

-- expect: replica select
SELECT id, v FROM plain WHERE id > 0

-- expect: replica select
SELECT id FROM over_plain

-- expect: replica select
SELECT n FROM item_counts

-- expect: replica select
SELECT 1 <+> 2

-- expect: replica select
SELECT p.id FROM plain p JOIN items i ON i.id = p.id WHERE i.v ~~ 'a%'

-- expect: replica select
WITH scratch AS (SELECT 1 AS v) SELECT v FROM scratch

-- expect: primary view_locking
SELECT id FROM locked

-- expect: primary view_sequence_function
SELECT n FROM next_ticket

-- expect: primary view_sequence_function
SELECT n FROM over_next

-- expect: primary view_advisory_lock
SELECT locked FROM locking_view

-- expect: primary unlogged_relation
SELECT v FROM scratch

-- expect: primary unlogged_relation
SELECT i.id FROM items i LEFT JOIN scratch s ON s.v = i.v

-- expect: primary unlogged_relation
SELECT count(*) FROM cat.scratch

-- expect: primary view_unlogged_relation
SELECT v FROM over_scratch

-- expect: primary volatile_operator
SELECT 1 #!# 2

-- expect: primary volatile_operator
SELECT 1 @@@ 2

-- expect: primary volatile_operator
SELECT 1 OPERATOR(cat.@@@) 2

-- expect: primary volatile_function
SELECT lock_key(99)
