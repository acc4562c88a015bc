//! The evaluator's database side: warm-start reads, and the commit that stores transitions,
//! outbox rows and offsets in one transaction.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use schemas::AlertEvent;
use sqlx::{PgConnection, PgPool, Row};

use crate::engine::{ColdDevice, CommitUnit, Micros, Status, Transition};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("encoding an alert event: {0}")]
    Encode(#[from] schemas::EncodeError),
    #[error("alert schema: {0}")]
    Schema(#[from] schemas::SchemaError),
    /// The stored offsets of these partitions moved: another instance owns them now.
    #[error("fenced: partitions {0:?} are owned by another instance")]
    Fenced(Vec<i32>),
}

impl StoreError {
    /// A foreign key violation: the only one `alerts` can raise is a transition of a rule
    /// deleted since it was evaluated.
    fn is_foreign_key_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("23503"))
    }
}

fn to_time(micros: Micros) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default()
}

/// How alert events are framed in the outbox (and so on the alerts topic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AlertFraming {
    /// Avro single-object encoding: no schema registry is configured.
    #[default]
    SingleObject,
    /// The Confluent wire format with the registry's id of `alert_event.v1` under
    /// `<alerts topic>-value`, registered at start-up.
    Confluent { schema_id: u32 },
}

impl AlertFraming {
    fn encode(self, event: &AlertEvent) -> Result<Vec<u8>, StoreError> {
        let codec = schemas::alert_codec()?;
        Ok(match self {
            AlertFraming::SingleObject => codec.encode(event)?,
            AlertFraming::Confluent { schema_id } => codec.encode_confluent(event, schema_id)?,
        })
    }
}

/// Stored progress of one partition: next offset and the event-time clock.
pub type StoredPartition = (i64, Option<Micros>);

/// Stored progress per partition of `topic` for `group`.
pub async fn load_offsets(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, StoredPartition>, sqlx::Error> {
    let rows: Vec<(i32, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT partition, next_offset, event_time_watermark FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(p, next, clock)| (p, (next, clock.map(|c| c.timestamp_micros()))))
        .collect())
}

/// An alert that is pending or firing.
#[derive(Debug, Clone)]
pub struct OpenAlertRow {
    pub rule_id: i64,
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub status: Status,
    pub started_at: Micros,
    pub value: Option<f64>,
}

/// Every open alert (the caller keeps those of its partitions).
pub async fn load_open_alerts(pool: &PgPool) -> Result<Vec<OpenAlertRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT rule_id, tenant_id::text AS tenant_id, device_id, site_id, status, started_at, value \
         FROM alerts WHERE status IN ('pending', 'firing')",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let status: String = row.try_get("status")?;
        let Some(status) = Status::parse(&status) else {
            continue;
        };
        let started_at: DateTime<Utc> = row.try_get("started_at")?;
        out.push(OpenAlertRow {
            rule_id: row.try_get("rule_id")?,
            tenant_id: row.try_get("tenant_id")?,
            device_id: row.try_get("device_id")?,
            site_id: row.try_get("site_id")?,
            status,
            started_at: started_at.timestamp_micros(),
            value: row.try_get("value")?,
        });
    }
    Ok(out)
}

/// Active devices of `tenants` with the time of their last stored reading.
///
/// From `device_latest`, unless a sink writes it behind the telemetry (`SINK_LATEST_INTERVAL`:
/// some partition's `consumer_offsets.latest_next_offset` is set, migration 0017). Then
/// readings stored since are looked up in `telemetry` too (one backward primary-key probe
/// per device), so a restart never mistakes a device that reported for a silent one.
pub async fn load_last_seen(
    pool: &PgPool,
    tenants: &[String],
) -> Result<Vec<(String, String, Option<String>, Micros)>, sqlx::Error> {
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    let behind: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM consumer_offsets WHERE latest_next_offset IS NOT NULL)",
    )
    .fetch_one(pool)
    .await?;
    let sql = if behind {
        "SELECT * FROM ( \
             SELECT d.tenant_id::text, d.device_id::text, d.site_id::text, \
                    greatest(l.time, (SELECT t.time FROM telemetry t \
                        WHERE t.tenant_id = d.tenant_id AND t.device_id = d.device_id \
                          AND t.time > coalesce(l.time, '-infinity') \
                        ORDER BY t.time DESC LIMIT 1)) AS time \
             FROM devices d LEFT JOIN device_latest l USING (tenant_id, device_id) \
             WHERE d.status = 'active' AND d.tenant_id = ANY($1) \
         ) s WHERE time IS NOT NULL"
    } else {
        "SELECT d.tenant_id::text, d.device_id::text, d.site_id::text, l.time \
         FROM devices d JOIN device_latest l USING (tenant_id, device_id) \
         WHERE d.status = 'active' AND d.tenant_id = ANY($1)"
    };
    let rows: Vec<(String, String, Option<String>, DateTime<Utc>)> =
        sqlx::query_as(sql).bind(tenants).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(t, d, s, time)| (t, d, s, time.timestamp_micros()))
        .collect())
}

/// For devices whose stored latest reading lies beyond their partition's clock (they will be
/// read again from Kafka), the time of their last reading at or before that clock, from
/// `telemetry` (one backward primary-key probe per device). Devices with none keep `None`.
pub async fn load_last_seen_before(
    pool: &PgPool,
    devices: &[(String, String, Micros)],
) -> Result<Vec<Option<Micros>>, sqlx::Error> {
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let index: Vec<i32> = (0..devices.len() as i32).collect();
    let tenants: Vec<&str> = devices.iter().map(|d| d.0.as_str()).collect();
    let ids: Vec<&str> = devices.iter().map(|d| d.1.as_str()).collect();
    let clocks: Vec<DateTime<Utc>> = devices.iter().map(|d| to_time(d.2)).collect();
    let rows: Vec<(i32, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT d.i, (SELECT t.time FROM telemetry t \
                      WHERE t.tenant_id = d.tenant_id AND t.device_id = d.device_id \
                        AND t.time <= d.clock ORDER BY t.time DESC LIMIT 1) \
         FROM unnest($1::int[], $2::text[], $3::text[], $4::timestamptz[]) \
              AS d(i, tenant_id, device_id, clock)",
    )
    .bind(&index)
    .bind(&tenants)
    .bind(&ids)
    .bind(&clocks)
    .fetch_all(pool)
    .await?;
    let mut out = vec![None; devices.len()];
    for (i, time) in rows {
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) {
            *slot = time.map(|t| t.timestamp_micros());
        }
    }
    Ok(out)
}

/// Window history of cold devices: each one's readings of the needed metrics in the longest
/// window before its first message, ascending by time. One query for the whole set.
pub async fn load_history(
    pool: &PgPool,
    cold: &[ColdDevice],
) -> Result<Vec<Vec<(Micros, BTreeMap<String, f64>)>>, sqlx::Error> {
    let mut out = vec![Vec::new(); cold.len()];
    if cold.is_empty() {
        return Ok(out);
    }
    let index: Vec<i32> = (0..cold.len() as i32).collect();
    let tenants: Vec<&str> = cold.iter().map(|c| c.tenant_id.as_str()).collect();
    let devices: Vec<&str> = cold.iter().map(|c| c.device_id.as_str()).collect();
    let before: Vec<DateTime<Utc>> = cold.iter().map(|c| to_time(c.before)).collect();
    let from: Vec<DateTime<Utc>> = cold
        .iter()
        .map(|c| {
            let longest = c.metrics.iter().map(|(_, w)| *w).max().unwrap_or(0);
            to_time(c.before.saturating_sub(longest))
        })
        .collect();
    let rows: Vec<(i32, DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
        "SELECT d.i, t.time, t.metrics \
         FROM unnest($1::int[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) \
              AS d(i, tenant_id, device_id, from_time, before_time) \
         JOIN telemetry t ON t.tenant_id = d.tenant_id AND t.device_id = d.device_id \
          AND t.time > d.from_time AND t.time < d.before_time \
         ORDER BY d.i, t.time",
    )
    .bind(&index)
    .bind(&tenants)
    .bind(&devices)
    .bind(&from)
    .bind(&before)
    .fetch_all(pool)
    .await?;
    for (i, time, metrics) in rows {
        let Some(device) = usize::try_from(i)
            .ok()
            .and_then(|i| cold.get(i).map(|c| (i, c)))
        else {
            continue;
        };
        let (slot, c) = device;
        let values: BTreeMap<String, f64> = c
            .metrics
            .iter()
            .filter_map(|(m, _)| {
                let v = metrics.get(m)?;
                let number = v
                    .as_f64()
                    .or_else(|| v.as_bool().map(|b| if b { 1.0 } else { 0.0 }))?;
                number.is_finite().then(|| (m.clone(), number))
            })
            .collect();
        out[slot].push((time.timestamp_micros(), values));
    }
    Ok(out)
}

/// What a commit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Transitions written to `alerts` and the outbox.
    pub written: usize,
    /// Transitions the table already reflected (a replay), written nowhere.
    pub skipped: usize,
    /// Transitions of rules deleted since they were evaluated, taken out of the unit.
    pub deleted_rules: usize,
}

/// Stores `unit` in one transaction: fenced offsets (and clocks), each transition's `alerts`
/// change, and an outbox row per change (its event encoded with `framing`). A partition whose stored offset moved makes the
/// whole transaction roll back with [`StoreError::Fenced`] naming it.
///
/// A transition of a rule deleted after it was evaluated (its `alerts` row would violate the
/// foreign key) is taken out of `unit` and the rest committed: left in, it would fail every
/// retry, and with it every tenant's alerts and offsets on this instance. A replay evaluates
/// with the rule gone, so it would not make that transition either.
pub async fn commit(
    pool: &PgPool,
    group: &str,
    topic: &str,
    framing: AlertFraming,
    unit: &mut CommitUnit,
) -> Result<Committed, StoreError> {
    match commit_once(pool, group, topic, framing, unit).await {
        Err(err) if err.is_foreign_key_violation() => {
            let before = unit.transitions.len();
            let rules: Vec<i64> = unit.transitions.iter().map(|t| t.rule.rule_id).collect();
            let existing: std::collections::HashSet<i64> = sqlx::query_scalar::<_, i64>(
                "SELECT rule_id FROM alert_rules WHERE rule_id = ANY($1)",
            )
            .bind(&rules)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
            unit.transitions
                .retain(|t| existing.contains(&t.rule.rule_id));
            let deleted_rules = before - unit.transitions.len();
            if deleted_rules == 0 {
                return Err(err);
            }
            tracing::warn!(
                transitions = deleted_rules,
                "transitions of deleted rules left out of the commit"
            );
            let done = commit_once(pool, group, topic, framing, unit).await?;
            Ok(Committed {
                deleted_rules,
                ..done
            })
        }
        other => other,
    }
}

async fn commit_once(
    pool: &PgPool,
    group: &str,
    topic: &str,
    framing: AlertFraming,
    unit: &CommitUnit,
) -> Result<Committed, StoreError> {
    let mut tx = pool.begin().await?;
    if !unit.progress.is_empty() {
        let fenced = store_progress(&mut tx, group, topic, unit).await?;
        if !fenced.is_empty() {
            tx.rollback().await?;
            return Err(StoreError::Fenced(fenced));
        }
    }
    let done = if unit.transitions.is_empty() {
        Committed::default()
    } else {
        apply_transitions(&mut tx, framing, &unit.transitions).await?
    };
    tx.commit().await?;
    Ok(done)
}

/// Applies the transitions to `alerts` in order (one server-side call), then writes an
/// outbox row for each one that changed a row (one insert).
async fn apply_transitions(
    conn: &mut PgConnection,
    framing: AlertFraming,
    transitions: &[Transition],
) -> Result<Committed, StoreError> {
    let column = |f: &dyn Fn(&Transition) -> Option<String>| -> Vec<Option<String>> {
        transitions.iter().map(f).collect()
    };
    let tenants = column(&|t| Some(t.tenant_id.clone()));
    let devices = column(&|t| Some(t.device_id.clone()));
    let sites = column(&|t| t.site_id.clone());
    let from = column(&|t| t.from.map(|s| s.as_str().to_owned()));
    let to = column(&|t| Some(t.to.as_str().to_owned()));
    let severities = column(&|t| Some(t.rule.severity.clone()));
    let metrics = column(&|t| t.rule.metric().map(str::to_owned));
    let rules: Vec<i64> = transitions.iter().map(|t| t.rule.rule_id).collect();
    let values: Vec<Option<f64>> = transitions.iter().map(|t| t.value).collect();
    let thresholds: Vec<Option<f64>> = transitions.iter().map(|t| t.rule.threshold()).collect();
    let started: Vec<DateTime<Utc>> = transitions.iter().map(|t| to_time(t.started_at)).collect();
    let times: Vec<DateTime<Utc>> = transitions.iter().map(|t| to_time(t.time)).collect();
    let ids: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT fleet_apply_alert_transitions($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&tenants)
    .bind(&rules)
    .bind(&devices)
    .bind(&sites)
    .bind(&from)
    .bind(&to)
    .bind(&severities)
    .bind(&metrics)
    .bind(&values)
    .bind(&thresholds)
    .bind(&started)
    .bind(&times)
    .fetch_one(&mut *conn)
    .await?;

    let mut done = Committed::default();
    let (
        mut event_ids,
        mut out_tenants,
        mut out_devices,
        mut alert_ids,
        mut payloads,
        mut received,
    ) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (t, id) in transitions
        .iter()
        .zip(ids.iter().chain(std::iter::repeat(&None)))
    {
        let Some(alert_id) = *id else {
            done.skipped += 1;
            continue;
        };
        let event = event(t, alert_id);
        payloads.push(framing.encode(&event)?);
        event_ids.push(event.event_id);
        out_tenants.push(t.tenant_id.as_str());
        out_devices.push(t.device_id.as_str());
        alert_ids.push(alert_id);
        received.push(t.received_at.map(to_time));
        done.written += 1;
    }
    if !event_ids.is_empty() {
        sqlx::query(
            "INSERT INTO alert_outbox (event_id, tenant_id, device_id, alert_id, payload, source_received_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bytea[], $6::timestamptz[]) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&event_ids)
        .bind(&out_tenants)
        .bind(&out_devices)
        .bind(&alert_ids)
        .bind(&payloads)
        .bind(&received)
        .execute(&mut *conn)
        .await?;
    }
    Ok(done)
}

/// The fenced offset update; returns the partitions whose expectation failed.
async fn store_progress(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    unit: &CommitUnit,
) -> Result<Vec<i32>, sqlx::Error> {
    let partitions: Vec<i32> = unit.progress.iter().map(|p| p.partition).collect();
    let expected: Vec<Option<i64>> = unit.progress.iter().map(|p| p.expected).collect();
    let next: Vec<i64> = unit.progress.iter().map(|p| p.next).collect();
    let clocks: Vec<Option<DateTime<Utc>>> =
        unit.progress.iter().map(|p| p.clock.map(to_time)).collect();
    let moved: Vec<i32> = sqlx::query_scalar(
        "WITH input AS ( \
             SELECT * FROM unnest($3::int[], $4::int8[], $5::int8[], $6::timestamptz[]) \
                 AS u(partition, expected, next_offset, clock) \
         ), moved AS ( \
             UPDATE consumer_offsets c SET next_offset = i.next_offset, \
                    event_time_watermark = i.clock, updated_at = now() \
             FROM input i \
             WHERE c.consumer_group = $1 AND c.topic = $2 AND c.partition = i.partition \
               AND i.expected IS NOT NULL AND c.next_offset = i.expected \
             RETURNING c.partition \
         ), created AS ( \
             INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, event_time_watermark) \
             SELECT $1, $2, i.partition, i.next_offset, i.clock FROM input i WHERE i.expected IS NULL \
             ON CONFLICT DO NOTHING \
             RETURNING partition \
         ) \
         SELECT partition FROM moved UNION ALL SELECT partition FROM created",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&expected)
    .bind(&next)
    .bind(&clocks)
    .fetch_all(conn)
    .await?;
    Ok(partitions
        .into_iter()
        .filter(|p| !moved.contains(p))
        .collect())
}

/// The `alerts.v1` event of a transition.
pub fn event(t: &Transition, alert_id: i64) -> AlertEvent {
    AlertEvent {
        event_id: t.event_id(),
        alert_id,
        rule_id: t.rule.rule_id,
        rule_name: t.rule.name.clone(),
        tenant_id: t.tenant_id.clone(),
        device_id: t.device_id.clone(),
        site_id: t.site_id.clone(),
        status: t.to.as_str().to_owned(),
        previous_status: t.from.map(|s| s.as_str().to_owned()),
        severity: t.rule.severity.clone(),
        metric: t.rule.metric().map(str::to_owned),
        value: t.value,
        threshold: t.rule.threshold(),
        time: to_time(t.time),
        emitted_at: Utc::now(),
    }
}
