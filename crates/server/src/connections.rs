//! The accept loop, on hyper's connection API rather than `axum::serve`, for what that lacks:
//! a header read timeout (which hyper also applies to an idle keep-alive connection waiting
//! for its next request), a cap on open connections, a listener that stays open while the
//! server drains (so new clients get a 503 body, not a refused connection), and a shutdown
//! that ends at its timeout whatever the clients do. The body read timeout is the extractor's
//! ([`crate::app::ApiJson`]): hyper reads bodies only as handlers ask.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::app::AppState;
use crate::engine_handle::Command;

/// After the drain timeout aborts what still runs, how long connections get to write the
/// aborted requests' last events before they are closed.
const ABORT_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cfg = &state.config;
    let permits = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let (draining_tx, draining_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut drain_deadline: Option<Instant> = None;
    let mut is_engine_dead = false;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut engine_stopped = std::pin::pin!(state.engine.health.stopped());
    loop {
        if drain_deadline.is_some() && conns.is_empty() {
            break;
        }
        tokio::select! {
            () = &mut shutdown, if drain_deadline.is_none() => {
                tracing::info!(
                    "shutting down: finishing running requests (at most {:?})",
                    cfg.drain_timeout
                );
                state.is_shutting_down.store(true, Ordering::Relaxed);
                drain_deadline = Some(Instant::now() + cfg.drain_timeout);
                draining_tx.send_replace(true);
            }
            () = &mut engine_stopped => {
                tracing::error!("the engine loop stopped unexpectedly; shutting down");
                state.is_shutting_down.store(true, Ordering::Relaxed);
                is_engine_dead = true;
                break;
            }
            () = tokio::time::sleep_until(drain_deadline.unwrap_or_else(Instant::now)),
                if drain_deadline.is_some() =>
            {
                tracing::warn!("drain timeout: aborting the requests still running");
                break;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (accepted, permit) = accept(&listener, &permits) => match accepted {
                Ok(tcp) => {
                    let draining = draining_rx.clone();
                    let conn = connection(tcp, router.clone(), cfg.header_timeout, draining, permit);
                    conns.spawn(conn);
                }
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    state.is_shutting_down.store(true, Ordering::Relaxed);
    state.engine.send(Command::AbortAll);
    let _ = tokio::time::timeout(ABORT_GRACE, async { while conns.join_next().await.is_some() {} }).await;
    conns.shutdown().await;
    drop(listener);
    if is_engine_dead {
        return Err(std::io::Error::other(
            "the engine loop stopped unexpectedly (see the log above)",
        ));
    }
    Ok(())
}

/// The next connection, once it may be served: at the cap, new clients wait in the backlog.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> (std::io::Result<TcpStream>, OwnedSemaphorePermit) {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    (listener.accept().await.map(|(tcp, _)| tcp), permit)
}

async fn connection(
    tcp: TcpStream,
    router: Router,
    header_timeout: Duration,
    mut draining: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    // Token events are small writes: without TCP_NODELAY, Nagle's algorithm and delayed ACKs
    // hold them for ~40 ms and streamed latencies become meaningless.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!("TCP_NODELAY: {e}");
    }
    // A connection opened while draining is served one request (a 503), then closed.
    let is_draining = *draining.borrow();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(!is_draining);
    let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router));
    let mut conn = std::pin::pin!(conn);
    if !is_draining {
        tokio::select! {
            r = conn.as_mut() => return log_end(r),
            // Finishes the request in flight, then closes (at once if idle).
            _ = draining.wait_for(|d| *d) => conn.as_mut().graceful_shutdown(),
        }
    }
    log_end(conn.await);
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!("connection ended: {e}");
    }
}
