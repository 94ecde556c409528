//! What strangler adds around every accepted client connection, below HTTP:
//! - the **header read deadline**: from the accept of a new connection, or from the first byte
//!   of a keep-alive connection's next request, to the end of the header, a client gets
//!   `--header-timeout` (default 10 s) in all — not per read, so a client dripping one byte at
//!   a time (slowloris), or connecting and sending nothing, cannot hold a connection. Idle
//!   keep-alive time between requests is not counted (Pingora's keep-alive timeout governs it);
//! - the **late cleanup** at shutdown: Pingora drops a connection still waiting for its request
//!   header the moment its listener shuts down — including one accepted microseconds earlier
//!   whose request is still on the wire. During an upgrade or a drain that would be a failed
//!   request; deferring the cleanup lets every accepted connection deliver its request;
//! - the **JSON answer to a refused header** (proxy listeners): a header Pingora's parser
//!   refuses never reaches a hook — Pingora answers it a bare `400` on the connection itself.
//!   While a header is being read the stream counts its lines and bytes (`head_scan`), and a
//!   `400` written then — it can only be that one — goes out as the proxy's own JSON answer:
//!   414 for a target too long, 431 for header fields too many or too large, 400 otherwise.
//!
//! The proxy hooks tell the clock where a request starts and ends (`header_done`,
//! `request_done`); the stream enforces it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::head_scan::HeadScan;
use crate::proxy::Limits;
use crate::router::{DEFAULT_ROUTE, NO_BACKEND};
use crate::{forwarding, metrics};

/// How Pingora's answer to a header its parser refused starts (`HttpSession::respond_error`).
const PINGORA_REFUSAL: &[u8] = b"HTTP/1.1 400 ";

/// How long bytes of a response stay in Pingora's write buffer once the connection waits for
/// more of it (see `DeadlineStream::poll_read`).
const FLUSH_DELAY: Duration = Duration::from_millis(2);

/// Why a connection was cut by the header read deadline (Pingora logs it; `logging` tells it
/// from the errors that matter).
pub const HEADER_TIMED_OUT: &str = "request header not complete within the header timeout";

/// How long a connection accepted just before shutdown gets to deliver its request header.
pub const LATE_REQUEST_GRACE: Duration = Duration::from_secs(1);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    // +1 so that 0 can mean "not started".
    EPOCH.elapsed().as_nanos() as u64 + 1
}

/// Where a connection stands between requests, shared by its stream and the proxy hooks.
#[derive(Debug)]
pub struct HeaderClock {
    /// Between requests: the next bytes read belong to a request header.
    awaiting_header: AtomicBool,
    /// When the current header's time began: the accept, for a connection's first request;
    /// the first byte, for a later one (0 until it arrives).
    started_ns: AtomicU64,
}

impl HeaderClock {
    /// The clock of a connection just accepted: its first header's time runs from now, as
    /// nginx's `client_header_timeout` does, so a connection that never sends a byte is let go
    /// as one that sends too slowly is.
    fn new() -> Self {
        HeaderClock {
            awaiting_header: AtomicBool::new(true),
            started_ns: AtomicU64::new(now_ns()),
        }
    }

    /// The request header has been read and parsed: stop the clock.
    pub fn header_done(&self) {
        self.awaiting_header.store(false, Ordering::Release);
        self.started_ns.store(0, Ordering::Release);
    }

    /// The request is over: the next bytes start the next header's clock.
    pub fn request_done(&self) {
        self.started_ns.store(0, Ordering::Release);
        self.awaiting_header.store(true, Ordering::Release);
    }
}

/// A client stream with the header read deadline.
pub struct DeadlineStream {
    inner: Stream,
    pub clock: Arc<HeaderClock>,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The proxy's request limits, to answer a refused header as they would; `None` where
    /// Pingora's own answer stays (the admin listener).
    refusals: Option<Limits>,
    /// The header being read, while `refusals` is set.
    scan: HeadScan,
    /// The JSON answer written in place of Pingora's bare 400, and how much of it is out.
    answer: Option<(Vec<u8>, usize)>,
    /// Bytes written since the last flush (see `poll_read`), and when they go out if nothing
    /// else flushes them.
    unflushed: bool,
    flush_due: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineStream")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .finish()
    }
}

impl DeadlineStream {
    pub fn new(inner: Stream, limit: Duration, refusals: Option<Limits>) -> Self {
        DeadlineStream {
            inner,
            clock: Arc::new(HeaderClock::new()),
            limit,
            timer: None,
            refusals,
            scan: HeadScan::default(),
            answer: None,
            unflushed: false,
            flush_due: None,
        }
    }

    /// The clock of the stream under a Pingora `Stream`, if it is one of ours.
    pub fn clock_of(stream: &Stream) -> Option<&Arc<HeaderClock>> {
        stream
            .as_any()
            .downcast_ref::<DeadlineStream>()
            .map(|s| &s.clock)
    }

    fn expired() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, HEADER_TIMED_OUT)
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.unflushed {
            // Pingora flushes a response with a `Content-Length` only at its end, or when its L4
            // write buffer (1 460 bytes) fills: the header and first bytes of a response whose
            // backend then pauses would wait with them, and the client would see nothing. A
            // connection reads whenever it waits (for the request body, or, idle, for the
            // client to close): what is buffered goes out `FLUSH_DELAY` after the wait began,
            // unless the response's end or a full buffer flushed it first. The delay keeps a
            // header and a body that a backend writes separately (WSGI servers do) in one
            // segment; a response written whole, nearly every one, never waits for it.
            let due = this
                .flush_due
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(FLUSH_DELAY)));
            if due.as_mut().poll(cx).is_ready()
                && Pin::new(&mut this.inner).poll_flush(cx).is_ready()
            {
                this.unflushed = false;
                this.flush_due = None;
            }
        }
        let awaiting = this.clock.awaiting_header.load(Ordering::Acquire);
        if !awaiting {
            this.timer = None;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let started = this.clock.started_ns.load(Ordering::Acquire);
        if started != 0 && now_ns().saturating_sub(started) > this.limit.as_nanos() as u64 {
            return Poll::Ready(Err(Self::expired()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                // A keep-alive connection's next header starts the clock with its first bytes
                // (a connection's first header has had it running since the accept). The timer
                // itself is armed only if a read of this header has to wait (below): a header
                // that arrives whole, nearly every one, never registers a timer.
                let read = &buf.filled()[before..];
                if started == 0 && !read.is_empty() {
                    this.clock.started_ns.store(now_ns(), Ordering::Release);
                    this.timer = None;
                    this.scan = HeadScan::default();
                }
                if this.refusals.is_some() {
                    this.scan.feed(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if started != 0 {
                    let remaining = this
                        .limit
                        .saturating_sub(Duration::from_nanos(now_ns().saturating_sub(started)));
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(remaining)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(Self::expired()));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl DeadlineStream {
    /// Whether `buf` is Pingora's bare 400 for a header its parser refused, to be answered as
    /// the proxy's own: the only thing written to a client while its header is still awaited.
    fn is_refusal(&self, buf: &[u8]) -> bool {
        // Cheapest first: nearly every write is a response, written while no header is awaited.
        self.clock.awaiting_header.load(Ordering::Acquire)
            && self.answer.is_none()
            && self.refusals.is_some()
            && buf.starts_with(PINGORA_REFUSAL)
    }

    /// Makes the JSON answer for the refused header, and counts the request.
    fn refuse(&mut self) {
        let Some(limits) = &self.refusals else {
            return;
        };
        // A header that came whole behind the previous request (pipelined) was read with that
        // one, not scanned as its own: nothing is known of it but that it was refused.
        let fresh = HeadScan::default();
        let scan = if self.clock.started_ns.load(Ordering::Acquire) == 0 {
            &fresh
        } else {
            &self.scan
        };
        let err = scan.refusal(limits);
        let request_id = forwarding::request_id(None);
        let method = scan.method_label();
        match err.h1_answer(&request_id, scan.is_head()) {
            Ok(wire) => {
                metrics::REQUESTS
                    .with_label_values(&[
                        DEFAULT_ROUTE,
                        NO_BACKEND,
                        method,
                        &err.status.to_string(),
                    ])
                    .inc();
                log::debug!(
                    "request {}: header refused by the HTTP parser, answered {}",
                    request_id.to_str().unwrap_or("-"),
                    err.status
                );
                self.answer = Some((wire, 0));
            }
            Err(e) => log::warn!("refused header: no JSON answer ({e}), Pingora's own is sent"),
        }
    }

    /// Writes the JSON answer in place of Pingora's 400 (`buf`), which is reported written once
    /// ours is out whole; anything after it (Pingora's answer has no body) is dropped.
    #[cold]
    fn poll_write_answer(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.answer.is_none() {
            self.refuse();
        }
        let Some((wire, sent)) = self.answer.as_mut() else {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        };
        while *sent < wire.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &wire[*sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(buf.len()))
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.answer.is_some() || this.is_refusal(buf) {
            return this.poll_write_answer(cx, buf);
        }
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.unflushed |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.unflushed = false;
            self.flush_due = None;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty());
        if self.answer.is_some() || first.is_some_and(|b| self.is_refusal(b)) {
            // One buffer at a time, as a stream without vectored writes.
            let first = first.map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.unflushed |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

/// Plain-text listeners only: no TLS to report.
impl Ssl for DeadlineStream {}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The application wrapped with these behaviours.
pub struct Guarded<A> {
    pub app: Arc<A>,
    pub header_timeout: Duration,
    /// The proxy's request limits: a header Pingora's parser refuses is answered as they
    /// would (`None`: Pingora's bare 400 stays).
    pub refusals: Option<Limits>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = Box::new(DeadlineStream::new(
            stream,
            self.header_timeout,
            self.refusals,
        ));
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        tokio::time::sleep(LATE_REQUEST_GRACE).await;
        self.app.cleanup().await;
    }
}
