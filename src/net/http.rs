//! The HTTP side of the port: reading a request head, routing it, the small responses, and
//! [`Rewind`], which hands the already-read head back to the WebSocket handshake. All of it works
//! on plain TCP and on TLS ([`Stream`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Healthz,
    Metrics,
    /// A WebSocket upgrade on the sync endpoint.
    Upgrade,
    /// A WebSocket upgrade on automerge-repo's endpoint (`/automerge`), with the token from
    /// the query (`?token=`: browsers cannot set headers on a WebSocket).
    UpgradeAutomerge(QueryToken),
    /// The sync endpoint without an upgrade.
    UpgradeRequired,
    MethodNotAllowed,
    NotFound,
    BadRequest,
}

/// A token from a URL's query. Its `Debug` never shows it: routes are logged.
#[derive(PartialEq, Eq)]
pub(crate) struct QueryToken(pub(crate) Option<String>);

impl std::fmt::Debug for QueryToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "token"
        } else {
            "no token"
        })
    }
}

/// The `token` parameter of a query string (`a=1&token=...`), percent-decoded.
fn query_token(query: &str) -> Option<String> {
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))?;
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().filter(|t| !t.is_empty())
}

/// The first byte of a TLS handshake record: what a `wss://` client sends first.
pub(crate) const TLS_HANDSHAKE: u8 = 0x16;

/// Reads bytes until the end of the request head (`\r\n\r\n`); returns everything read (the head
/// and any bytes after it). `Ok(None)` when the peer closed first.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf.is_empty() && chunk[0] == TLS_HANDSHAKE {
            // A TLS client on a plain port: fail now rather than wait for a head that never
            // comes (its client hello has no `\r\n\r\n`).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TLS handshake on a port without TLS",
            ));
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[searched_from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

/// Parses the head and decides what it asks for.
pub(crate) fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Route::BadRequest,
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let is_get = req.method == Some("GET");
    let wants_upgrade = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && String::from_utf8_lossy(h.value)
                .trim()
                .eq_ignore_ascii_case("websocket")
    });
    match (path, is_get) {
        ("/healthz" | "/metrics" | "/" | "/sync" | "/automerge", false) => Route::MethodNotAllowed,
        ("/automerge", true) if wants_upgrade => {
            Route::UpgradeAutomerge(QueryToken(query_token(query)))
        }
        ("/automerge", true) => Route::UpgradeRequired,
        ("/healthz", true) => Route::Healthz,
        ("/metrics", true) => Route::Metrics,
        ("/" | "/sync", true) if wants_upgrade => Route::Upgrade,
        ("/" | "/sync", true) => Route::UpgradeRequired,
        _ => Route::NotFound,
    }
}

/// Writes a complete response and closes our side (no keep-alive: these endpoints are polled
/// rarely).
pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &str,
) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Shorthand for a plain-text response.
pub(crate) async fn respond_text<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    body: &str,
) -> io::Result<()> {
    respond(stream, status, "text/plain; charset=utf-8", "", body).await
}

/// A connection's byte stream: plain TCP, or TLS over TCP.
pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is several KiB, which a plain session should not carry.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A stream that first yields bytes already read from it: the WebSocket handshake re-reads the
/// request head that routing looked at.
pub(crate) struct Rewind {
    prefix: Vec<u8>,
    pos: usize,
    inner: Stream,
}

impl Rewind {
    pub(crate) fn new(prefix: Vec<u8>, inner: Stream) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = |path: &str, extra: &str| {
            route(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
        };
        assert_eq!(get("/healthz", ""), Route::Healthz);
        assert_eq!(get("/metrics?x=1", ""), Route::Metrics);
        assert_eq!(get("/", "Upgrade: WebSocket\r\n"), Route::Upgrade);
        assert_eq!(get("/sync", "upgrade: websocket\r\n"), Route::Upgrade);
        assert_eq!(get("/sync", ""), Route::UpgradeRequired);
        let ws = "Upgrade: websocket\r\n";
        assert_eq!(
            get("/automerge", ws),
            Route::UpgradeAutomerge(QueryToken(None))
        );
        assert_eq!(
            get("/automerge?x=1&token=a.b%2Dc", ws),
            Route::UpgradeAutomerge(QueryToken(Some("a.b-c".into())))
        );
        assert_eq!(
            get("/automerge?token=bad%zz%", ws),
            Route::UpgradeAutomerge(QueryToken(Some("bad%zz%".into())))
        );
        assert_eq!(get("/automerge", ""), Route::UpgradeRequired);
        assert_eq!(format!("{:?}", QueryToken(Some("secret".into()))), "token");
        assert_eq!(get("/nope", ""), Route::NotFound);
        assert_eq!(
            route(b"POST /healthz HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"\x00\x01garbage\r\n\r\n"), Route::BadRequest);
    }
}
