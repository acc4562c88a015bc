//! One tenant's requests never hold up another's: at most `TENANT_MAX_CONCURRENT_REQUESTS`
//! of a tenant are in progress, the excess waits on its own tenant (a second, then 429 with
//! `Retry-After`), and other tenants are served meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{key, Fixture, OTHER, OWN};
use query_api::auth::Role;
use query_api::Limits;
use schemas::LayoutChoice;
use tower::ServiceExt;

#[tokio::test]
async fn a_tenant_at_its_request_limit_does_not_hold_up_another() {
    let limits = Limits {
        tenant_concurrency: 1,
        statement_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let fx = Fixture::with(LayoutChoice::Postgres, limits).await.unwrap();
    for tenant in [OWN, OTHER] {
        sqlx::query("INSERT INTO devices (tenant_id, device_id) VALUES ($1, 'd1')")
            .bind(tenant)
            .execute(&fx.owner)
            .await
            .unwrap();
    }
    let other_viewer = key(&fx.owner, Role::Viewer, Some(OTHER)).await.unwrap();
    for k in [&fx.admin, &fx.viewer, &other_viewer] {
        let (status, _, text) = fx.get("/v1/devices/d1", k).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }

    // acme's only permit is held by a request waiting on a row lock.
    let mut blocker = fx.owner.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = 'd1' FOR UPDATE")
        .bind(OWN)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let slow = tokio::spawn({
        let app = fx.app.clone();
        let admin = fx.admin.clone();
        async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri("/v1/devices/d1/disable")
                .header("authorization", format!("Bearer {admin}"))
                .body(Body::empty())
                .unwrap();
            app.oneshot(request).await.unwrap().status()
        }
    });
    plumbing::testing::eventually(
        "acme's request waiting on the row lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&fx.db.name)
            .fetch_one(&fx.owner)
            .await
            .map_err(|e| e.to_string())?;
            (waiting == 1).then_some(()).ok_or(format!("{waiting} waiting"))
        },
    )
    .await
    .unwrap();

    // The other tenant is served at once.
    let (status, _, text) = fx.get("/v1/devices/d1", &other_viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // acme's next request waits its turn, then is refused naming the limit.
    let request = Request::builder()
        .uri("/v1/devices/d1")
        .header("authorization", format!("Bearer {}", fx.viewer))
        .body(Body::empty())
        .unwrap();
    let response = fx.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body["error"],
        "this tenant has reached its limit of 1 requests in progress (TENANT_MAX_CONCURRENT_REQUESTS); retry shortly"
    );

    // The lock goes: the held request completes and acme is served again.
    blocker.rollback().await.unwrap();
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let (status, body, text) = fx.get("/v1/devices/d1", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(body["status"], "disabled");
}
