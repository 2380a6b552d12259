-- Autovacuum settings of the job table (issue 14). Every job is inserted, updated at its
-- lease and at its outcome, and deleted after retention: the table turns over constantly,
-- and each non-HOT update leaves a dead tuple and dead index entries behind. The global
-- defaults wait for 20 % of the table to be dead (10 % changed for an analysis), which on
-- a table of millions of rows lets the lease index fill with dead entries that every lease
-- walks. Here a vacuum starts after 2 % (at least 1000 rows) and an analysis after 5 %, so
-- the indexes stay lean and the planner's figures current as the table grows.
--
-- A new table is not helped by these: autovacuum looks at a database once per
-- autovacuum_naptime (a minute by default), a server-wide setting.
ALTER TABLE jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_analyze_threshold = 1000
);
