-- PLACEHOLDER on branch i17-notify only: #16 owns migration 0004 and `tally migrate`
-- refuses gaps in the numbering. Drop this file when merging #16's 0004.
SELECT 1;
