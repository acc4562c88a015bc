//! One shutdown signal from `main`, observed by every loop.
//!
//! Services take a [`Shutdown`] token in `run`; `main` cancels it on SIGTERM or SIGINT, a test
//! cancels it whenever it likes.

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled when the process receives SIGTERM or SIGINT.
pub fn shutdown_signal() -> Shutdown {
    let token = Shutdown::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!(error = %err, "cannot install signal handlers; falling back to ctrl-c");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
