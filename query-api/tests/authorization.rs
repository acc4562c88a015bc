//! The authorization matrix: every endpoint × every role × own/other tenant gets the expected
//! status, and no response to an `acme` key carries any identifier of `globex`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::{Method, StatusCode};
use common::{seed_tenant, Fixture, OTHER, OWN};
use query_api::auth::Role;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Own,
    Other,
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy)]
enum Allowed {
    Everyone,
    Writers,
    Listers,
    Operators,
    OperatorAdmin,
}

impl Allowed {
    fn admits(self, role: Role) -> bool {
        match self {
            Allowed::Everyone => true,
            Allowed::Writers => role.can_write(),
            Allowed::Listers => role.can_write() || role.is_operator(),
            Allowed::Operators => role.is_operator(),
            Allowed::OperatorAdmin => role == Role::OperatorAdmin,
        }
    }
}

/// What a tenant key gets when it addresses the other tenant.
#[derive(Debug, Clone, Copy)]
enum OtherTenant {
    /// 404, exactly like a missing object.
    NotFound,
    /// The request succeeds and shows nothing of the other tenant (lists, counts).
    Empty,
}

struct Case {
    method: Method,
    /// Placeholders: {tenant} {site} {device} {rule} {alert} {victim_*} {n}.
    path: &'static str,
    body: Option<Value>,
    allowed: Allowed,
    ok: StatusCode,
    other: OtherTenant,
}

fn case(
    method: Method,
    path: &'static str,
    body: Option<Value>,
    allowed: Allowed,
    ok: u16,
    other: OtherTenant,
) -> Case {
    Case {
        method,
        path,
        body,
        allowed,
        ok: StatusCode::from_u16(ok).unwrap(),
        other,
    }
}

fn cases() -> Vec<Case> {
    use Allowed::*;
    use OtherTenant::*;
    let rule =
        json!({"name": "cold", "kind": "threshold", "metric": "temp", "op": "<", "threshold": 0});
    vec![
        case(Method::GET, "/v1/tenants", None, Everyone, 200, Empty),
        case(
            Method::GET,
            "/v1/tenants/{tenant}",
            None,
            Everyone,
            200,
            NotFound,
        ),
        case(
            Method::PATCH,
            "/v1/tenants/{tenant}",
            Some(json!({"name": "renamed"})),
            OperatorAdmin,
            200,
            NotFound,
        ),
        case(
            Method::POST,
            "/v1/tenants",
            Some(json!({"tenant_id": "new-{n}", "name": "n"})),
            OperatorAdmin,
            201,
            Empty,
        ),
        case(Method::GET, "/v1/sites", None, Everyone, 200, Empty),
        case(
            Method::POST,
            "/v1/sites",
            Some(json!({"site_id": "s-{n}", "name": "s"})),
            Writers,
            201,
            NotFound,
        ),
        case(
            Method::GET,
            "/v1/sites/{site}",
            None,
            Everyone,
            200,
            NotFound,
        ),
        case(
            Method::DELETE,
            "/v1/sites/{victim_site}",
            None,
            Writers,
            204,
            NotFound,
        ),
        case(Method::GET, "/v1/devices", None, Everyone, 200, Empty),
        case(
            Method::POST,
            "/v1/devices",
            Some(json!({"device_id": "d-{n}"})),
            Writers,
            201,
            NotFound,
        ),
        case(
            Method::GET,
            "/v1/devices/{device}",
            None,
            Everyone,
            200,
            NotFound,
        ),
        case(
            Method::POST,
            "/v1/devices/{device}/disable",
            None,
            Writers,
            200,
            NotFound,
        ),
        case(
            Method::POST,
            "/v1/devices/{device}/enable",
            None,
            Writers,
            200,
            NotFound,
        ),
        case(
            Method::POST,
            "/v1/devices/{device}/rotate-token",
            None,
            Writers,
            200,
            NotFound,
        ),
        case(
            Method::GET,
            "/v1/devices/{device}/latest",
            None,
            Everyone,
            200,
            NotFound,
        ),
        case(
            Method::GET,
            "/v1/devices/{device}/telemetry?metrics=temp&bucket=1m",
            None,
            Everyone,
            200,
            NotFound,
        ),
        case(Method::GET, "/v1/gateway-tokens", None, Listers, 200, Empty),
        case(
            Method::POST,
            "/v1/gateway-tokens",
            Some(json!({"name": "gw"})),
            Writers,
            201,
            NotFound,
        ),
        case(
            Method::DELETE,
            "/v1/gateway-tokens/{victim_token}",
            None,
            Writers,
            204,
            NotFound,
        ),
        case(Method::GET, "/v1/api-keys", None, Listers, 200, Empty),
        case(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "k", "role": "viewer"})),
            Writers,
            201,
            NotFound,
        ),
        case(
            Method::DELETE,
            "/v1/api-keys/{victim_key}",
            None,
            Writers,
            204,
            NotFound,
        ),
        case(Method::GET, "/v1/me", None, Everyone, 200, Empty),
        case(Method::GET, "/v1/fleet/latest", None, Everyone, 200, Empty),
        case(
            Method::GET,
            "/v1/fleet/latest?site={site}&metrics=temp",
            None,
            Everyone,
            200,
            Empty,
        ),
        case(Method::GET, "/v1/fleet/summary", None, Everyone, 200, Empty),
        case(Method::GET, "/v1/alerts", None, Everyone, 200, Empty),
        case(
            Method::POST,
            "/v1/alerts/{alert}/ack",
            None,
            Writers,
            200,
            NotFound,
        ),
        case(Method::GET, "/v1/alert-rules", None, Everyone, 200, Empty),
        case(
            Method::POST,
            "/v1/alert-rules",
            Some(rule.clone()),
            Writers,
            201,
            NotFound,
        ),
        case(
            Method::GET,
            "/v1/alert-rules/{rule}",
            None,
            Everyone,
            200,
            NotFound,
        ),
        case(
            Method::PUT,
            "/v1/alert-rules/{victim_rule}",
            Some(rule),
            Writers,
            200,
            NotFound,
        ),
        case(
            Method::DELETE,
            "/v1/alert-rules/{victim_rule}",
            None,
            Writers,
            204,
            NotFound,
        ),
        case(
            Method::GET,
            "/v1/system/metrics",
            None,
            Operators,
            200,
            Empty,
        ),
    ]
}

struct World {
    fx: Fixture,
    /// (rule, alert) per tenant.
    own: (i64, i64),
    other: (i64, i64),
}

impl World {
    fn tenant(target: Target) -> &'static str {
        match target {
            Target::Own => OWN,
            Target::Other => OTHER,
        }
    }

    fn prefix(target: Target) -> &'static str {
        match target {
            Target::Own => "ac",
            Target::Other => "gx",
        }
    }

    /// The concrete request of `case` against `target`'s objects; victims of destructive
    /// requests are created fresh so every call has its own.
    async fn request(&self, case: &Case, target: Target, n: usize) -> (String, Option<Value>) {
        let tenant = Self::tenant(target);
        let prefix = Self::prefix(target);
        let (rule, alert) = match target {
            Target::Own => self.own,
            Target::Other => self.other,
        };
        let mut path = case
            .path
            .replace("{tenant}", tenant)
            .replace("{site}", &format!("{prefix}-site"))
            .replace("{device}", &format!("{prefix}-dev-1"))
            .replace("{rule}", &rule.to_string())
            .replace("{alert}", &alert.to_string());
        let pool = &self.fx.owner;
        if path.contains("{victim_site}") {
            let site = format!("{prefix}-victim-{n}");
            sqlx::query("INSERT INTO sites (tenant_id, site_id, name) VALUES ($1, $2, 'v')")
                .bind(tenant)
                .bind(&site)
                .execute(pool)
                .await
                .unwrap();
            path = path.replace("{victim_site}", &site);
        }
        if path.contains("{victim_token}") {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ($1, 'v', $2) RETURNING token_id",
            )
            .bind(tenant)
            .bind(format!("{prefix}-victim-token-{n}"))
            .fetch_one(pool)
            .await
            .unwrap();
            path = path.replace("{victim_token}", &id.to_string());
        }
        if path.contains("{victim_key}") {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO api_keys (tenant_id, role, name, key_prefix, key_hash) \
                 VALUES ($1, 'viewer', 'v', 'fsk_victim', $2) RETURNING key_id",
            )
            .bind(tenant)
            .bind(format!("{prefix}-victim-key-{n}"))
            .fetch_one(pool)
            .await
            .unwrap();
            path = path.replace("{victim_key}", &id.to_string());
        }
        if path.contains("{victim_rule}") {
            let id = common::rule(pool, tenant).await.unwrap();
            path = path.replace("{victim_rule}", &id.to_string());
        }
        let body = case
            .body
            .as_ref()
            .map(|b| serde_json::from_str(&b.to_string().replace("{n}", &n.to_string())).unwrap());
        (path, body)
    }
}

fn with_tenant(path: &str, tenant: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}tenant={tenant}")
}

#[tokio::test]
async fn every_endpoint_role_and_tenant_gets_the_expected_status_and_nothing_of_other_tenants() {
    let fx = Fixture::new().await.unwrap();
    let own = seed_tenant(&fx.owner, OWN, "ac").await.unwrap();
    let other = seed_tenant(&fx.owner, OTHER, "gx").await.unwrap();
    // Older readings of every device, rolled up: series requests read both tenants' rollups
    // through the view.
    sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, site_id, seq, metrics) \
         SELECT now() - interval '10 minutes', tenant_id, device_id, site_id, 0, '{\"temp\": 19}' \
         FROM devices",
    )
    .execute(&fx.owner)
    .await
    .unwrap();
    sqlx::query("SELECT * FROM fleet_refresh_rollup_1m(1000)")
        .execute(&fx.owner)
        .await
        .unwrap();
    let world = World { fx, own, other };
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut n = 0;
    for case in cases() {
        for role in [
            Role::Viewer,
            Role::Admin,
            Role::Operator,
            Role::OperatorAdmin,
        ] {
            for target in [Target::Own, Target::Other] {
                let tenant = World::tenant(target);
                // Operators always name the tenant; tenant keys try both the bare path (their
                // own tenant implied) and naming the target tenant explicitly. Each variant
                // gets its own victims and identifiers.
                let named = [true, false];
                let variants: &[bool] = if case.path.starts_with("/v1/tenants") {
                    &[false]
                } else if role.is_operator() {
                    &named[..1]
                } else {
                    &named
                };
                for &name_tenant in variants {
                    n += 1;
                    let (path, body) = world.request(&case, target, n).await;
                    let uri = if name_tenant {
                        with_tenant(&path, tenant)
                    } else {
                        path
                    };
                    let expected = if !case.allowed.admits(role) {
                        StatusCode::FORBIDDEN
                    } else if !role.is_operator()
                        && target == Target::Other
                        // A bare path without the other tenant's objects is a request about
                        // the key's own tenant.
                        && (name_tenant || case.path.contains('{'))
                    {
                        match case.other {
                            OtherTenant::NotFound => StatusCode::NOT_FOUND,
                            OtherTenant::Empty => case.ok,
                        }
                    } else {
                        case.ok
                    };
                    let key = world.fx.key(role);
                    let (status, json, text) = world
                        .fx
                        .call(case.method.clone(), &uri, Some(key), body.clone())
                        .await;
                    checked += 1;
                    if status != expected {
                        failures.push(format!(
                            "{} {uri} as {role} ({target:?}): expected {expected}, got {status}: {text}",
                            case.method
                        ));
                    }
                    if !role.is_operator() && (text.contains(OTHER) || text.contains("gx-")) {
                        failures.push(format!(
                            "{} {uri} as {role}: response names the other tenant: {text}",
                            case.method
                        ));
                    }
                    if (status.is_client_error() || status.is_server_error())
                        && json.get("error").and_then(Value::as_str).is_none()
                    {
                        failures.push(format!(
                            "{} {uri}: error body not in the error shape: {text}",
                            case.method
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} requests failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 250, "only {checked} requests checked");
}

#[tokio::test]
async fn requests_without_a_valid_key_are_401_on_every_endpoint() {
    let fx = Fixture::new().await.unwrap();
    for case in cases() {
        let mut path = case.path.replace("{tenant}", OWN);
        for (placeholder, value) in [
            ("{site}", "s"),
            ("{device}", "d"),
            ("{rule}", "1"),
            ("{alert}", "1"),
            ("{victim_site}", "s"),
            ("{victim_token}", "1"),
            ("{victim_key}", "1"),
            ("{victim_rule}", "1"),
        ] {
            path = path.replace(placeholder, value);
        }
        for key in [
            None,
            Some("fsk_0000000000000000000000000000000000000000"),
            Some(""),
        ] {
            let (status, json, text) = fx
                .call(case.method.clone(), &path, key, case.body.clone())
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{} {path} with {key:?}: {text}",
                case.method
            );
            assert_eq!(json["error"], "missing or invalid API key");
        }
    }
}

#[tokio::test]
async fn revoked_keys_and_keys_of_suspended_tenants_are_refused() {
    let fx = Fixture::new().await.unwrap();
    let (status, body, _) = fx
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(&fx.admin),
            Some(json!({"name": "temp", "role": "viewer"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let key = body["key"].as_str().unwrap().to_owned();
    let key_id = body["api_key"]["key_id"].as_i64().unwrap();
    assert!(body["api_key"].get("key_hash").is_none());
    assert_eq!(fx.get("/v1/devices", &key).await.0, StatusCode::OK);
    let (status, _, _) = fx
        .call(
            Method::DELETE,
            &format!("/v1/api-keys/{key_id}"),
            Some(&fx.admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        fx.get("/v1/devices", &key).await.0,
        StatusCode::UNAUTHORIZED
    );

    let (status, _, _) = fx
        .call(
            Method::PATCH,
            &format!("/v1/tenants/{OWN}"),
            Some(&fx.operator_admin),
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fx.get("/v1/devices", &fx.viewer).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(fx.get("/v1/devices", &fx.operator).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_device_token_is_shown_once_and_stored_only_as_its_hash() {
    let fx = Fixture::new().await.unwrap();
    let (status, body, _) = fx
        .call(
            Method::POST,
            "/v1/devices",
            Some(&fx.admin),
            Some(json!({"device_id": "pump-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = body["token"].as_str().unwrap().to_owned();
    let stored: String =
        sqlx::query_scalar("SELECT token_hash FROM devices WHERE device_id = 'pump-1'")
            .fetch_one(&fx.owner)
            .await
            .unwrap();
    assert_eq!(stored, query_api::auth::hash_secret(&token));
    let (_, listed, text) = fx.get("/v1/devices", &fx.admin).await;
    assert!(
        !text.contains(&token) && !text.contains(&stored),
        "{listed}"
    );
    let (status, rotated, _) = fx
        .call(
            Method::POST,
            "/v1/devices/pump-1/rotate-token",
            Some(&fx.admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(rotated["token"], body["token"]);
}

#[tokio::test]
async fn operators_must_name_a_tenant_for_one_tenants_object() {
    let fx = Fixture::new().await.unwrap();
    seed_tenant(&fx.owner, OWN, "ac").await.unwrap();
    let (status, body, _) = fx.get("/v1/devices/ac-dev-1", &fx.operator).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "tenant");
    let (status, _, _) = fx
        .get(&format!("/v1/devices/ac-dev-1?tenant={OWN}"), &fx.operator)
        .await;
    assert_eq!(status, StatusCode::OK);
}
