//! The accept loop behind [`crate::serve`]: HTTP/1.1 connections served by hyper with the
//! limits that keep clients from holding sockets forever (issue 11):
//!
//! - a **header read timeout**: a connection that does not send a complete request head
//!   within it (half a header, or nothing at all on an idle keep-alive connection) is closed;
//! - a **bound on open connections**: beyond it, a new connection gets an immediate 503 in
//!   OpenAI's error shape and is closed, instead of holding a file descriptor until the
//!   process runs out of them;
//! - a **write stall timeout**: a client that stops reading its response (a stream it never
//!   drains) is disconnected once a write has waited that long.
//!
//! The body read timeout lives in `app()` (see `read_body` in lib.rs), so that in-process
//! tests see it too. What this is not: routing or request handling (that is [`crate::app`]).
//! References: axum 0.8's `serve` (the loop this replaces, which offers no timeouts) and
//! hyper's `http1::Builder`.

use crate::error::ApiError;
use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Connection limits (`moelab serve` flags).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

/// How long a refused connection gets to read its 503 before it is closed.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// Accepts connections until `shutdown` resolves, then asks every connection to finish its
/// request in flight and waits for all of them (the caller bounds that wait).
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let open = Arc::new(Semaphore::new(max));
    // refused connections linger briefly to read their 503; they are bounded too
    let refusing = Arc::new(Semaphore::new(max));
    let (closing, closed) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let sock = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let sock = match sock {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE/ENFILE/ECONNABORTED: the listener itself is fine; back off a little
                // instead of spinning (as axum::serve does)
                eprintln!("warning: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                let (app, closed) = (app.clone(), closed.clone());
                tokio::spawn(async move {
                    connection(sock, app, limits, closed).await;
                    drop(permit);
                });
            }
            Err(_) => match refusing.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        refuse(sock, max).await;
                        drop(permit);
                    });
                }
                // NOTE: past twice the bound, a connection is closed without a word
                Err(_) => drop(sock),
            },
        }
    }
    drop(listener);
    let _ = closing.send(true);
    // every connection returns its permit when it ends
    let _ = open.acquire_many(max as u32).await;
}

async fn connection(
    sock: TcpStream,
    app: Router,
    limits: Limits,
    mut closed: watch::Receiver<bool>,
) {
    let io = TokioIo::new(WriteTimeout::new(sock, limits.write_timeout));
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        app.clone().oneshot(req.map(Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = closed.wait_for(|c| *c) => {}
    }
    // shutting down: finish the request in flight (if any), then close
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Answers 503 on a connection over the bound and closes it. The request is drained (not
/// read) after the response so that closing does not reset the connection before the
/// client has read the answer.
async fn refuse(mut sock: TcpStream, max: usize) {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        format!(
            "the server has {max} open connections, its limit (--max-connections); retry shortly"
        ),
    )
    .code("too_many_connections")
    .body()
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        sock.write_all(resp.as_bytes()).await?;
        sock.shutdown().await?;
        let mut sink = [0u8; 4096];
        while sock.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// A socket whose writes fail with `TimedOut` once one has been pending for `limit`: the
/// client stopped reading (its receive window stayed full), so the connection is dropped
/// instead of held open forever.
struct WriteTimeout<T> {
    io: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> WriteTimeout<T> {
    fn new(io: T, limit: Duration) -> WriteTimeout<T> {
        WriteTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// After the socket answered Pending: Pending until the stall lasts `limit`, then an error.
    fn stall<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {limit:?}"),
        )))
    }

    fn track<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.stall(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.track(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.track(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression test for issue 11 (found beside it): a client that stops reading its
    /// stream kept its connection forever. (Through real sockets the kernel's buffers on
    /// loopback hold a whole reply of the test models, so the wrapper is tested on a pipe.)
    #[tokio::test]
    async fn issue_11_a_write_that_stalls_fails_after_the_limit() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut w = WriteTimeout::new(near, Duration::from_millis(200));
        // the peer reads: writes go through, however long it all takes
        for _ in 0..4 {
            w.write_all(&[1u8; 48]).await.unwrap();
            let mut buf = [0u8; 48];
            far.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // the peer stops reading: the pipe fills and the write gives up after 200 ms
        let t = std::time::Instant::now();
        let e = w.write_all(&[2u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
