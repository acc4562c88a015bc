//! One shutdown signal from `main`, observed by every loop.
//!
//! Services take a [`Shutdown`] token in `run`; `main` cancels it on SIGTERM or SIGINT, a test
//! cancels it whenever it likes.

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled when the process receives SIGTERM or SIGINT. The handlers are installed
/// before this returns (it must be called inside the runtime), so a signal sent once anything
/// after it has happened — say, the admin endpoint answers — is never the default action.
pub fn shutdown_signal() -> Shutdown {
    let token = Shutdown::new();
    let trigger = token.clone();
    let signals = Signals::install();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutdown signal received");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
enum Signals {
    Installed {
        term: tokio::signal::unix::Signal,
        int: tokio::signal::unix::Signal,
    },
    CtrlC,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Self::Installed { term, int },
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, "cannot install signal handlers; falling back to ctrl-c");
                Self::CtrlC
            }
        }
    }

    async fn wait(self) {
        match self {
            Self::Installed { mut term, mut int } => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            Self::CtrlC => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Self {
        Self
    }

    async fn wait(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
