//! What applying alert transitions costs PostgreSQL: `fleet_apply_alert_transitions` as
//! migration 0019 defines it (set-based, in rounds) against the one-by-one PL/pgSQL loop of
//! migration 0008 (the baseline, created beside it under another name), in the same run, on
//! the same table.
//!
//! The shape is an evaluator's start-up burst (issue #18): `BENCH_TRANSITIONS` alerts
//! (default 20,000; 100 rules over 10 tenants) opened as pending, then fired, then resolved,
//! `BENCH_CALL` transitions per call (default 500), each call a transaction of its own as a
//! `fleet_writer`, on a table already holding `BENCH_SEED_ALERTS` resolved alerts (50,000).
//! A fourth phase sends each alert's opening and firing in the same call (two rounds).
//! Both functions run `BENCH_ROUNDS` times (default 2), alternately; the best time counts.
//!
//! `cargo bench -p evaluator-stream --bench alert_transitions` with `DATABASE_URL` set.
//! Prints figures; asserts only that both functions touched every alert.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use plumbing::testing::TestDb;
use schemas::LayoutChoice;
use sqlx::PgPool;

const TENANTS: usize = 10;
const RULES: usize = 100;
const BASELINE: &str = "fleet_apply_alert_transitions_0008";
const CANDIDATE: &str = "fleet_apply_alert_transitions";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One transition's columns.
struct Raw {
    tenant: String,
    rule: i64,
    device: String,
    from: Option<&'static str>,
    to: &'static str,
}

/// Applies `calls` with `function`, a transaction each; returns the time and how many
/// transitions touched an alert.
async fn apply(pool: &PgPool, function: &str, calls: &[Vec<Raw>]) -> Result<(Duration, usize)> {
    let sql = format!("SELECT {function}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
    let now = Utc::now();
    let started = Instant::now();
    let mut touched = 0;
    for call in calls {
        let ids: Vec<Option<i64>> = sqlx::query_scalar(&sql)
            .bind(call.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.rule).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.device.as_str()).collect::<Vec<_>>())
            .bind(call.iter().map(|_| None::<&str>).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.from).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.to).collect::<Vec<_>>())
            .bind(call.iter().map(|_| "warning").collect::<Vec<_>>())
            .bind(call.iter().map(|_| "temp").collect::<Vec<_>>())
            .bind(call.iter().map(|_| Some(40.0)).collect::<Vec<_>>())
            .bind(call.iter().map(|_| Some(30.0)).collect::<Vec<_>>())
            .bind(call.iter().map(|_| now).collect::<Vec<DateTime<Utc>>>())
            .bind(call.iter().map(|_| now).collect::<Vec<DateTime<Utc>>>())
            .fetch_one(pool)
            .await?;
        touched += ids.iter().filter(|id| id.is_some()).count();
    }
    Ok((started.elapsed(), touched))
}

#[tokio::main]
async fn main() -> Result<()> {
    let transitions: usize = env_or("BENCH_TRANSITIONS", 20_000);
    let per_call: usize = env_or("BENCH_CALL", 500).max(1);
    let seeded: i64 = env_or("BENCH_SEED_ALERTS", 50_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 2).max(1);

    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let baseline = include_str!("../../schemas/migrations/0008_alert_transitions.sql")
        .replace("fleet_apply_alert_transitions", BASELINE);
    sqlx::raw_sql(&baseline).execute(&db.pool).await?;
    sqlx::query(
        "INSERT INTO tenants (tenant_id, name) SELECT 't' || g, 't' || g FROM generate_series(0, $1 - 1) g",
    )
    .bind(TENANTS as i32)
    .execute(&db.pool)
    .await?;
    let rules: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO alert_rules (tenant_id, name, metric, kind, op, threshold) \
         SELECT 't' || (g % $1), 'r' || g, 'temp', 'threshold', '>', 30 \
         FROM generate_series(0, $2 - 1) g RETURNING tenant_id::text, rule_id",
    )
    .bind(TENANTS as i32)
    .bind(RULES as i32)
    .fetch_all(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO alerts (tenant_id, rule_id, device_id, status, severity, metric, value, \
                             threshold, started_at, fired_at, resolved_at) \
         SELECT r.tenant_id, r.rule_id, 'seed' || g, 'resolved', 'warning', 'temp', 40, 30, \
                now() - interval '1 day', now() - interval '1 day', now() - interval '23 hours' \
         FROM generate_series(0, $1 - 1) g \
         JOIN alert_rules r ON r.rule_id = (SELECT min(rule_id) FROM alert_rules) + g % $2",
    )
    .bind(seeded)
    .bind(RULES as i64)
    .execute(&db.pool)
    .await?;
    sqlx::query("ANALYZE alerts").execute(&db.pool).await?;
    let writer = db.role_pool("fleet_writer", 1).await?;

    let phase = |from: Option<&'static str>, to: &'static str| -> Vec<Vec<Raw>> {
        let all: Vec<Raw> = (0..transitions)
            .map(|i| {
                let (tenant, rule) = &rules[i % rules.len()];
                Raw {
                    tenant: tenant.clone(),
                    rule: *rule,
                    device: format!("burst{i}"),
                    from,
                    to,
                }
            })
            .collect();
        chunk(all, per_call)
    };
    // Each alert opened and fired within one call: the set-based function's second round.
    let open_and_fire = {
        let mut all = Vec::new();
        for i in 0..transitions / 2 {
            let (tenant, rule) = &rules[i % rules.len()];
            for (from, to) in [(None, "pending"), (Some("pending"), "firing")] {
                all.push(Raw {
                    tenant: tenant.clone(),
                    rule: *rule,
                    device: format!("both{i}"),
                    from,
                    to,
                });
            }
        }
        chunk(all, per_call)
    };
    let phases: Vec<(&str, Vec<Vec<Raw>>)> = vec![
        ("open (none → pending)", phase(None, "pending")),
        ("fire (pending → firing)", phase(Some("pending"), "firing")),
        (
            "resolve (firing → resolved)",
            phase(Some("firing"), "resolved"),
        ),
        ("open and fire in one call", open_and_fire),
    ];

    println!(
        "alert transitions: {transitions} per phase, {per_call} per call, {seeded} resolved alerts already stored; best of {rounds}"
    );
    let mut best = vec![[Duration::MAX; 2]; phases.len()];
    for _ in 0..rounds {
        for (f, function) in [BASELINE, CANDIDATE].into_iter().enumerate() {
            sqlx::query("DELETE FROM alerts WHERE device_id NOT LIKE 'seed%'")
                .execute(&db.pool)
                .await?;
            sqlx::query("VACUUM ANALYZE alerts")
                .execute(&db.pool)
                .await?;
            for (p, (name, calls)) in phases.iter().enumerate() {
                let (took, touched) = apply(&writer, function, calls).await?;
                let sent: usize = calls.iter().map(Vec::len).sum();
                assert_eq!(
                    touched, sent,
                    "{function}, {name}: every transition applies"
                );
                best[p][f] = best[p][f].min(took);
            }
        }
    }
    println!(
        "| phase | 0008 loop (µs per transition) | 0019 set-based (µs per transition) | speed-up |"
    );
    println!("|---|---|---|---|");
    for ((name, calls), [old, new]) in phases.iter().zip(&best) {
        let sent = calls.iter().map(Vec::len).sum::<usize>() as f64;
        let per = |d: &Duration| d.as_secs_f64() * 1e6 / sent;
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× |",
            per(old),
            per(new),
            old.as_secs_f64() / new.as_secs_f64()
        );
    }
    Ok(())
}

fn chunk(all: Vec<Raw>, size: usize) -> Vec<Vec<Raw>> {
    let mut calls = Vec::new();
    let mut it = all.into_iter().peekable();
    while it.peek().is_some() {
        calls.push(it.by_ref().take(size).collect());
    }
    calls
}
