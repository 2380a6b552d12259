-- A job's annotations (issue 15's job-field recipe): a JSON object the caller attaches at
-- enqueue, kept byte for byte like args and never read by Keel, hence json rather than
-- jsonb. NULL when not given, so jobs without annotations store nothing more. A nullable
-- column without a default is added to the catalog only: no table rewrite, and the
-- ACCESS EXCLUSIVE lock is held for an instant.
ALTER TABLE jobs ADD COLUMN meta json;
