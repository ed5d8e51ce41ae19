//! The physical limit beside `wharf bench send --postgres`: pgbench's rate of durable
//! single-row INSERTs of the same body size, with the same number of clients, on the same
//! server, in the same run.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Connection;

use crate::store::postgres::{Redactor, redacted_url};

/// Table pgbench inserts into; created and dropped around the run.
const TABLE: &str = "wharf_pgbench_insert";

/// Pulls `tps = N` out of pgbench's report.
pub fn parse_tps(report: &str) -> Option<f64> {
    report
        .lines()
        .find(|l| l.trim_start().starts_with("tps = "))
        .and_then(|l| l.trim_start()["tps = ".len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs pgbench for `duration` with `clients` connections, each transaction one INSERT of a
/// `size`-byte body; returns transactions (= rows) per second.
pub async fn insert_rate(
    url: &str,
    clients: usize,
    size: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let shown = redacted_url(url);
    let redactor = Redactor::for_url(url);
    let mut c = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("connect to {shown}: {}", redactor.redact(&e.to_string())))?;
    let ddl = format!(
        "DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, body bytea NOT NULL)"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut c)
        .await
        .with_context(|| format!("create {TABLE}"))?;
    let script = tempfile_path("wharf-pgbench.sql");
    std::fs::write(
        &script,
        format!("INSERT INTO {TABLE} (body) VALUES (convert_to(repeat('x', {size}), 'UTF8'));\n"),
    )
    .context("write the pgbench script")?;
    let out = Command::new("pgbench")
        .args(["-n", "-j", "2", "-c", &clients.to_string(), "-T"])
        .arg(duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&script)
        .arg(url)
        .output();
    let _ = std::fs::remove_file(&script);
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {TABLE}")))
        .execute(&mut c)
        .await;
    let out = out.context("run pgbench (Debian: apt-get install postgresql-client-15)")?;
    let report = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}",
            redactor.redact(&String::from_utf8_lossy(&out.stderr))
        );
    }
    parse_tps(&report).with_context(|| format!("no tps in pgbench's report: {report}"))
}

/// The server's checkpoint state around a measured run: a checkpoint in the middle of a
/// run makes it write a full page image of every page it touches first and competes for the
/// disk, so the same run swings by half (see BENCHMARKS.md) and says which case it was.
pub struct Checkpoints {
    conn: sqlx::PgConnection,
    max_wal_size: String,
    count: i64,
    forced: bool,
}

impl Checkpoints {
    /// Forces a checkpoint (when the role may: superuser or `pg_checkpoint`), so every run
    /// starts from the same state, and notes how many the server has done.
    pub async fn start(url: &str) -> anyhow::Result<Checkpoints> {
        let redactor = Redactor::for_url(url);
        let mut conn = sqlx::PgConnection::connect(url).await.map_err(|e| {
            anyhow::anyhow!(
                "connect to {}: {}",
                redacted_url(url),
                redactor.redact(&e.to_string())
            )
        })?;
        let forced = sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await.is_ok();
        let max_wal_size: String = sqlx::query_scalar("SELECT current_setting('max_wal_size')")
            .fetch_one(&mut conn)
            .await
            .context("read max_wal_size")?;
        let count = Self::done(&mut conn).await?;
        Ok(Checkpoints {
            conn,
            max_wal_size,
            count,
            forced,
        })
    }

    async fn done(conn: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
        sqlx::query_scalar(
            "SELECT (checkpoints_timed + checkpoints_req)::int8 FROM pg_stat_bgwriter",
        )
        .fetch_one(conn)
        .await
        .context("read pg_stat_bgwriter")
    }

    /// One line for the report: the setting that decides how often checkpoints come, and how
    /// many came during the run.
    pub async fn finish(mut self) -> anyhow::Result<String> {
        let during = Self::done(&mut self.conn).await? - self.count;
        Ok(format!(
            "checkpoints during the run: {during} (max_wal_size {}; {})",
            self.max_wal_size,
            if self.forced {
                "started right after a CHECKPOINT"
            } else {
                "this role may not CHECKPOINT, so the start state is the server's"
            }
        ))
    }
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_is_read_from_the_report() {
        let report = "number of failed transactions: 0 (0.000%)\nlatency average = 2.1 ms\n\
                      initial connection time = 12.3 ms\n\
                      tps = 30123.456789 (without initial connection time)\n";
        assert_eq!(parse_tps(report), Some(30123.456789));
        assert_eq!(parse_tps("no figures"), None);
        assert_eq!(parse_tps("tps = x"), None);
    }
}
