//! The connector's settings (`source.postgres` in a pipeline file).

use std::fmt;
use std::time::Duration;

use oppen_connector_api::Result;
use serde::Deserialize;

use crate::tls;
use crate::wire::SESSION_OPTIONS;
use crate::wire::quote_ident;

/// `source: postgres:` in a pipeline file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string; may hold a password, so never printed.
    pub url: String,
    /// `schema.table` (schema defaults to `public`).
    pub table: String,
    /// The replication slot; created if missing.
    pub slot: String,
    /// The publication; created for the table if missing.
    pub publication: String,
    /// The columns that identify a row; default: the primary key.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// Seconds between heartbeats that let an idle table's slot advance.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
    /// Connections copying the snapshot in parallel (default: the number of
    /// cores, at most 4, half of them when the server runs on this machine,
    /// and one for tables under 64 MB; when set, it holds for any table).
    #[serde(default)]
    pub snapshot_workers: Option<usize>,
}

pub(crate) fn default_heartbeat() -> u64 {
    60
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
    {
        let user = auth.split(':').next().unwrap_or("");
        return format!("{scheme}://{user}:***@{host}");
    }
    // key=value form
    url.split_whitespace()
        .map(|part| {
            if part.starts_with("password=") {
                "password=***"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl PostgresConfig {
    /// Problems found without connecting.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = tls::DbConfig::parse(&self.url) {
            problems.push(format!(
                "url is not a usable PostgreSQL connection string: {e}"
            ));
        }
        if self.table.trim().is_empty() || self.table.split('.').count() > 2 {
            problems.push(format!(
                "table `{}` must be `table` or `schema.table`",
                self.table
            ));
        }
        for (what, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                problems.push(format!(
                    "{what} `{name}` may hold only lowercase letters, digits and `_`"
                ));
            }
        }
        if self.key.as_ref().is_some_and(Vec::is_empty) {
            problems.push("key is empty; leave it out to use the primary key".into());
        }
        problems
    }

    /// The table as schema and name.
    pub fn table(&self) -> Table {
        match self.table.split_once('.') {
            Some((schema, name)) => Table {
                schema: schema.to_string(),
                name: name.to_string(),
            },
            None => Table {
                schema: "public".into(),
                name: self.table.clone(),
            },
        }
    }

    pub(crate) fn sql_config(&self) -> Result<tls::DbConfig> {
        let mut c = tls::DbConfig::parse(&self.url)?;
        c.sql.options(SESSION_OPTIONS);
        c.sql.application_name("oppen");
        c.sql.connect_timeout(Duration::from_secs(10));
        Ok(c)
    }
}

/// A table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
}

impl Table {
    /// `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://oppen:s3cret@db:5432/econ"),
            "postgres://oppen:***@db:5432/econ"
        );
        assert_eq!(
            redact_url("host=db user=oppen password=s3cret"),
            "host=db user=oppen password=***"
        );
    }

    #[test]
    pub(crate) fn validates_config() {
        let c = PostgresConfig {
            url: "postgres://localhost/db".into(),
            table: "a.b.c".into(),
            slot: "Bad-Slot".into(),
            publication: "ok_pub".into(),
            key: Some(vec![]),
            heartbeat_seconds: 60,
            snapshot_workers: None,
        };
        let problems = c.validate();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(
            PostgresConfig {
                table: "invoices".into(),
                ..c
            }
            .table()
            .to_string(),
            "public.invoices"
        );
    }
}
