-- A job's annotations (issue 15's job-field recipe): a JSON object the caller attaches at
-- enqueue, kept byte for byte like args and never read by Keel. NULL when not given, so
-- jobs without annotations store nothing more. Adding a nullable column without a default
-- rewrites nothing.
ALTER TABLE jobs ADD COLUMN meta TEXT;
