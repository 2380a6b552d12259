//! Versioned schema migrations, embedded in the binary.
//!
//! Each backend has an ordered list of SQL files under `migrations/<backend>/`. A database
//! records what it has applied in `keel_schema_migrations` (version, name, checksum). Applying
//! is idempotent: already-applied versions are skipped, an applied migration whose text has
//! since changed is an error (someone edited history), and a database that is ahead of this
//! binary is refused rather than silently run against an unknown schema. Concurrency between
//! processes starting at once is the backend's job (a Postgres advisory lock, SQLite's
//! `BEGIN IMMEDIATE`).

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Strictly increasing version, starting at 1.
    pub version: i64,
    /// Short description (the file name without prefix).
    pub name: &'static str,
    /// The SQL to run, possibly several statements.
    pub sql: &'static str,
}

impl Migration {
    /// A stable fingerprint of the SQL text (64-bit FNV-1a, hex) to detect edits of applied
    /// migrations. Not a security measure.
    pub fn checksum(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.sql.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// A [`Migration`] with its SQL embedded from `migrations/<path>` at compile time: one line
/// per entry in the tables below (a macro because `include_str!` takes only a literal).
macro_rules! migration {
    ($version:literal, $name:literal, $path:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $path)),
        }
    };
}

/// The SQLite migrations, in order.
pub const SQLITE: &[Migration] = &[
    migration!(1, "jobs", "sqlite/0001_jobs.sql"),
    migration!(
        2,
        "queues_idempotency",
        "sqlite/0002_queues_idempotency.sql"
    ),
    migration!(3, "scale_out", "sqlite/0003_scale_out.sql"),
    migration!(
        4,
        "lean_listing_indexes",
        "sqlite/0004_lean_listing_indexes.sql"
    ),
    migration!(5, "job_meta", "sqlite/0005_job_meta.sql"),
];

/// The Postgres migrations, in order.
pub const POSTGRES: &[Migration] = &[
    migration!(1, "jobs", "postgres/0001_jobs.sql"),
    migration!(
        2,
        "queues_idempotency",
        "postgres/0002_queues_idempotency.sql"
    ),
    migration!(3, "scale_out", "postgres/0003_scale_out.sql"),
    migration!(4, "autovacuum", "postgres/0004_autovacuum.sql"),
    migration!(
        5,
        "lean_listing_indexes",
        "postgres/0005_lean_listing_indexes.sql"
    ),
    migration!(6, "job_meta", "postgres/0006_job_meta.sql"),
    migration!(7, "lease_walk", "postgres/0007_lease_walk.sql"),
    migration!(
        8,
        "complete_function",
        "postgres/0008_complete_function.sql"
    ),
    migration!(9, "generic_plans", "postgres/0009_generic_plans.sql"),
    migration!(
        10,
        "listing_skips_completed",
        "postgres/0010_listing_skips_completed.sql"
    ),
    migration!(
        11,
        "lease_commits_async",
        "postgres/0011_lease_commits_async.sql"
    ),
    migration!(
        12,
        "heartbeat_release_functions",
        "postgres/0012_heartbeat_release_functions.sql"
    ),
    migration!(
        13,
        "heartbeat_skips_busy_rows",
        "postgres/0013_heartbeat_skips_busy_rows.sql"
    ),
    migration!(
        14,
        "completion_locks_as_it_updates",
        "postgres/0014_completion_locks_as_it_updates.sql"
    ),
];

/// What a migration run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run, in order.
    pub applied: Vec<i64>,
    /// The schema version after the run.
    pub current: i64,
}

/// Why migrations could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    /// An applied migration's SQL differs from the one in this binary.
    #[error(
        "migration {version} ({name}) was applied with checksum {applied} but this binary has {embedded}; applied migrations must never be edited"
    )]
    ChecksumMismatch {
        /// The version.
        version: i64,
        /// Its name.
        name: &'static str,
        /// Checksum recorded in the database.
        applied: String,
        /// Checksum of the embedded SQL.
        embedded: String,
    },
    /// The database has a version this binary does not know.
    #[error(
        "the database schema is at version {found}, newer than this Keel knows (up to {known}); upgrade Keel"
    )]
    DatabaseAhead {
        /// Highest version in the database.
        found: i64,
        /// Highest version this binary knows.
        known: i64,
    },
}

/// Decides which migrations to run given what the database has applied
/// (`(version, checksum)` pairs). Pure, so the rules are tested without a database.
pub fn pending<'a>(
    all: &'a [Migration],
    applied: &[(i64, String)],
) -> Result<Vec<&'a Migration>, MigrationError> {
    let known = all.last().map_or(0, |m| m.version);
    if let Some(found) = applied.iter().map(|(v, _)| *v).max()
        && found > known
    {
        return Err(MigrationError::DatabaseAhead { found, known });
    }
    let mut todo = Vec::new();
    for m in all {
        match applied.iter().find(|(v, _)| *v == m.version) {
            Some((_, sum)) if *sum != m.checksum() => {
                return Err(MigrationError::ChecksumMismatch {
                    version: m.version,
                    name: m.name,
                    applied: sum.clone(),
                    embedded: m.checksum(),
                });
            }
            Some(_) => {}
            None => todo.push(m),
        }
    }
    Ok(todo)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &[Migration] = &[
        Migration {
            version: 1,
            name: "a",
            sql: "CREATE TABLE a (x int);",
        },
        Migration {
            version: 2,
            name: "b",
            sql: "CREATE TABLE b (x int);",
        },
    ];

    #[test]
    fn versions_are_strictly_increasing() {
        for list in [SQLITE, POSTGRES] {
            assert!(list.windows(2).all(|w| w[0].version < w[1].version));
            assert_eq!(list[0].version, 1);
        }
    }

    #[test]
    fn fresh_database_gets_everything() {
        let todo = pending(TWO, &[]).unwrap();
        assert_eq!(todo.iter().map(|m| m.version).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn applied_ones_are_skipped() {
        let todo = pending(TWO, &[(1, TWO[0].checksum())]).unwrap();
        assert_eq!(todo.iter().map(|m| m.version).collect::<Vec<_>>(), [2]);
        let all = [(1, TWO[0].checksum()), (2, TWO[1].checksum())];
        assert!(pending(TWO, &all).unwrap().is_empty());
    }

    #[test]
    fn edited_history_is_refused() {
        let err = pending(TWO, &[(1, "deadbeef".into())]).unwrap_err();
        assert!(matches!(
            err,
            MigrationError::ChecksumMismatch { version: 1, .. }
        ));
    }

    #[test]
    fn newer_database_is_refused() {
        let err = pending(TWO, &[(3, "x".into())]).unwrap_err();
        assert_eq!(err, MigrationError::DatabaseAhead { found: 3, known: 2 });
    }
}
