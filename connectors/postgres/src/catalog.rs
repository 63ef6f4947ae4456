//! Catalog inspection: the table, its key, its columns and their types, the
//! publication and the server's settings, read over a plain SQL connection.

use oppen_connector_api::{Error, Result};

use crate::config::{PostgresConfig, Table};
use crate::tls;
use crate::types::Kind;
use crate::wire::{quote_ident, transient};
use crate::{types, wire};

/// A column as the connector decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// The SQL type as the catalog names it.
    pub sql_type: String,
    pub kind: Kind,
}

/// Whether every host of `config` is this machine (a loopback address,
/// `localhost` or a Unix socket).
pub(crate) fn on_this_machine(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        })
}

/// What `oppen check --connect` reports.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub server_version: String,
    pub wal_level: String,
    pub can_replicate: bool,
    pub table_exists: bool,
    pub primary_key: Vec<String>,
    pub key: Vec<String>,
    /// `default`, `full`, `index` or `nothing`.
    pub replica_identity: String,
    pub identity_columns: Vec<String>,
    pub columns: Vec<ColumnInfo>,
    pub publication_exists: bool,
    pub publication_has_table: bool,
    pub slot_exists: bool,
    /// Bytes of WAL the slot keeps on the server.
    pub retained_wal_bytes: Option<i64>,
    /// Problems that stop the connector, each with what to do.
    pub problems: Vec<String>,
}

pub(crate) fn sql_error(what: &str, e: &tokio_postgres::Error) -> Error {
    if let Some(untrusted) = tls::certificate_error(e) {
        return untrusted;
    }
    let fatal = e
        .as_db_error()
        .is_some_and(|db| wire::is_fatal_sqlstate(db.code().code()));
    let message = match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{what}: {} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        // The cause too: "error performing TLS handshake" alone says little.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{what}: {e}: {cause}"),
            None => format!("{what}: {e}"),
        },
    };
    if fatal {
        Error::Config(message)
    } else {
        transient(message)
    }
}

/// Connects a plain SQL session.
pub(crate) async fn connect_sql(config: &tls::DbConfig) -> Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect()
        .await
        .map_err(|e| sql_error("connect to PostgreSQL", &e))?;
    tokio::spawn(async move {
        if let Ok(Err(e)) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Looks up a type OID: its kind (domains resolved to their base) and SQL name.
pub(crate) async fn type_kind(
    client: &tokio_postgres::Client,
    oid: u32,
    typmod: i32,
) -> Result<(Kind, String)> {
    let row = client
        .query_opt(
            "WITH RECURSIVE d(oid, typmod, depth) AS ( \
               SELECT $1::oid, $2::int, 0 \
               UNION ALL SELECT t.typbasetype, t.typtypmod, d.depth + 1 FROM d JOIN pg_type t ON t.oid = d.oid \
               WHERE t.typtype = 'd' AND d.depth < 10) \
             SELECT d.oid::int8, d.typmod, t.typtype::text, format_type($1::oid, $2::int), \
               t.typcategory::text, t.typelem::int8 \
             FROM d JOIN pg_type t ON t.oid = d.oid ORDER BY d.depth DESC LIMIT 1",
            &[&oid, &typmod],
        )
        .await
        .map_err(|e| sql_error("reading a column type", &e))?;
    Ok(match row {
        Some(r) => {
            let base: i64 = r.get(0);
            let base_typmod: i32 = r.get(1);
            let typtype: String = r.get(2);
            let category: String = r.get(4);
            let element: i64 = r.get(5);
            let kind = if category == "A" {
                Kind::Array(match element {
                    20 | 21 | 23 | 700 | 701 | 1700 => types::Element::Number,
                    16 => types::Element::Bool,
                    _ => types::Element::Text,
                })
            } else {
                Kind::of(base as u32, base_typmod, typtype == "e")
            };
            (kind, r.get(3))
        }
        None => (Kind::Other, format!("oid {oid}")),
    })
}

/// Types the connector maps to their text form on purpose (no warning).
pub(crate) fn known_as_text(sql_type: &str) -> bool {
    sql_type.ends_with("[]")
        || [
            "interval", "time", "bytea", "numeric", "inet", "cidr", "macaddr", "money", "xml",
            "bit", "oid", "tsvector",
        ]
        .iter()
        .any(|t| sql_type.starts_with(t))
}

/// Connects and checks everything the connector needs.
pub async fn inspect(config: &PostgresConfig, shares_slot: bool) -> Result<Inspection> {
    let client = connect_sql(&config.sql_config()?).await?;
    inspect_with(&client, config, shares_slot).await
}

/// Whether `publication` publishes `table`.
pub(crate) async fn publication_has(
    client: &tokio_postgres::Client,
    publication: &str,
    table: &Table,
) -> Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await
        .map_err(|e| sql_error("reading the publication", &e))?
        .is_some())
}

/// `shared`: the pipeline shares its slot with others of its process, which
/// add their tables to the publication they share (so a publication without
/// the table is no problem).
pub(crate) async fn inspect_with(
    client: &tokio_postgres::Client,
    config: &PostgresConfig,
    shared: bool,
) -> Result<Inspection> {
    let q = |e: tokio_postgres::Error| sql_error("inspecting the source", &e);
    let table = config.table();
    let server = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('wal_level'), \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
             current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(q)?;
    let mut i = Inspection {
        server_version: server.get(0),
        wal_level: server.get(1),
        can_replicate: server.get::<_, Option<bool>>(2).unwrap_or(false),
        table_exists: false,
        primary_key: Vec::new(),
        key: Vec::new(),
        replica_identity: String::new(),
        identity_columns: Vec::new(),
        columns: Vec::new(),
        publication_exists: false,
        publication_has_table: false,
        slot_exists: false,
        retained_wal_bytes: None,
        problems: Vec::new(),
    };
    if server.get::<_, i32>(3) < 140_000 {
        i.problems.push(format!(
            "PostgreSQL {} is too old: the connector needs 14 or newer (logical messages, TID range scans)",
            i.server_version
        ));
    }
    if i.wal_level != "logical" {
        i.problems.push(format!(
            "wal_level is `{}`; logical replication needs `logical`: set wal_level = logical in postgresql.conf and restart the server",
            i.wal_level
        ));
    }
    if !i.can_replicate {
        i.problems.push(
            "the user may not replicate: ALTER ROLE <user> WITH REPLICATION (or connect as one that may)"
                .into(),
        );
    }
    let rel = client
        .query_opt(
            "SELECT c.oid::int8, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(q)?;
    let slot = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(q)?;
    i.slot_exists = slot.is_some();
    i.retained_wal_bytes = slot.and_then(|r| r.get(0));
    i.publication_exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(q)?
        .is_some();
    let Some(rel) = rel else {
        i.problems.push(format!(
            "table {table} does not exist (or the user cannot see it); check `table:` and the user's privileges"
        ));
        return Ok(i);
    };
    i.table_exists = true;
    let oid: i64 = rel.get(0);
    let identity: String = rel.get(1);
    i.replica_identity = match identity.as_str() {
        "d" => "default",
        "f" => "full",
        "i" => "index",
        _ => "nothing",
    }
    .into();
    if i.publication_exists {
        i.publication_has_table = publication_has(client, &config.publication, &table).await?;
        if !i.publication_has_table && !shared {
            i.problems.push(format!(
                "publication `{}` exists but does not include {table}: ALTER PUBLICATION {} ADD TABLE {} \
                 (pipelines that share a slot in one `oppen run` add their tables themselves)",
                config.publication,
                quote_ident(&config.publication),
                table.quoted()
            ));
        }
    }
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod FROM pg_attribute a \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(q)?;
    for c in columns {
        let type_oid: i64 = c.get(1);
        let (kind, sql_type) = type_kind(client, type_oid as u32, c.get(2)).await?;
        if kind == Kind::Other && !known_as_text(&sql_type) {
            tracing::warn!(table = %table, column = c.get::<_, String>(0), sql_type, "unknown column type; published as the server's text form");
        }
        i.columns.push(ColumnInfo {
            name: c.get(0),
            sql_type,
            kind,
        });
    }
    let index_columns = |flag: &'static str| {
        format!(
            "SELECT a.attname::text FROM pg_index x JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum \
             WHERE x.indrelid = $1::int8::oid AND x.{flag} ORDER BY k.ord"
        )
    };
    i.primary_key = client
        .query(&index_columns("indisprimary"), &[&oid])
        .await
        .map_err(q)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    i.identity_columns = match i.replica_identity.as_str() {
        "default" => i.primary_key.clone(),
        "index" => client
            .query(&index_columns("indisreplident"), &[&oid])
            .await
            .map_err(q)?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        "full" => i.columns.iter().map(|c| c.name.clone()).collect(),
        _ => Vec::new(),
    };
    i.key = config.key.clone().unwrap_or_else(|| i.primary_key.clone());
    if i.key.is_empty() {
        i.problems.push(format!(
            "{table} has no primary key and the pipeline names no `key:`; add `key: [column, ...]` \
             naming columns that identify a row (with REPLICA IDENTITY FULL or USING INDEX on them)"
        ));
    }
    for k in &i.key {
        if !i.columns.iter().any(|c| &c.name == k) {
            i.problems
                .push(format!("key column `{k}` is not a column of {table}"));
        }
    }
    if i.replica_identity == "nothing" {
        i.problems.push(format!(
            "{table} has REPLICA IDENTITY NOTHING: updates and deletes carry no key, so they cannot be published; \
             run ALTER TABLE {} REPLICA IDENTITY DEFAULT (or FULL)",
            table.quoted()
        ));
    } else if !i.key.is_empty() && !i.key.iter().all(|k| i.identity_columns.contains(k)) {
        i.problems.push(format!(
            "the key ({}) is not part of {table}'s replica identity ({}: {}), so deletes would not carry it; \
             use the primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
            i.key.join(", "),
            i.replica_identity,
            i.identity_columns.join(", "),
            table.quoted()
        ));
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_on_this_machine_gets_half_the_cores_for_the_snapshot() {
        let here = |url: &str| on_this_machine(&url.parse::<tokio_postgres::Config>().unwrap());
        assert!(here("postgres://u@127.0.0.1:5432/db"));
        assert!(here("postgres://u@localhost/db"));
        assert!(here("postgres://u@[::1]:5432/db"));
        assert!(here("host=/var/run/postgresql user=u dbname=db"));
        assert!(!here("postgres://u@db.kommun.se/db"));
        assert!(!here("postgres://u@10.0.0.5/db"));
        assert!(!here("host=127.0.0.1,db.kommun.se user=u"));
        let large = 100_000; // pages: 800 MB
        assert_eq!(crate::snapshot::connections(large, None, 2, true), 1);
        assert_eq!(crate::snapshot::connections(large, None, 1, true), 1);
        assert_eq!(crate::snapshot::connections(large, None, 8, true), 4);
        assert_eq!(crate::snapshot::connections(large, None, 6, true), 3);
        assert_eq!(crate::snapshot::connections(large, None, 2, false), 2);
        assert_eq!(crate::snapshot::connections(large, None, 16, false), 4);
        // Small tables: one connection unless the pipeline says otherwise,
        // at most one per 4,096 pages by default, one per page when set.
        assert_eq!(crate::snapshot::connections(8_191, None, 16, false), 1);
        assert_eq!(crate::snapshot::connections(12_288, None, 16, false), 3);
        assert_eq!(crate::snapshot::connections(273, Some(3), 2, true), 3);
        assert_eq!(crate::snapshot::connections(2, Some(3), 2, true), 2);
        assert_eq!(crate::snapshot::connections(0, Some(0), 2, true), 1);
    }
}
