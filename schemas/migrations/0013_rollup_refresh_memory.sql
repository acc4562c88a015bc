-- 1-minute rollups (0009, 0012): room for one refresh step's aggregation in memory (issue 18).
--
-- A step of 100,000 devices × 4 metrics is 400,000 groups per minute, ~100 MB of hash table;
-- with work_mem = 64MB (hash tables get hash_mem_multiplier = 2 times that) a step of two
-- minutes or more spilled to disk, which made a refresh that had fallen behind slower still:
-- in a 10-minute fleet_e2e run the refresh ran for 580 of the 600 seconds. The sink now asks
-- for steps of at most 2 minutes (maintenance::STEP_MINUTES) and a step may use 256 MB (512 MB
-- of hash table). One step runs at a time (advisory lock).
ALTER FUNCTION fleet_refresh_rollup_1m(integer) SET work_mem = '256MB';
