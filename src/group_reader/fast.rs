//! The group reader's fast path: its blocking reads (XREADGROUP) over a
//! socket of our own, parsed straight from the bytes into [`StreamEntry`]
//! values.
//!
//! redis-rs parses every reply into a `redis::Value` tree with a combinator
//! parser, which [`super::reply::parse_read_reply`] then converts; on the
//! throughput benchmark that was ~18% of tripline's CPU, nearly all of it
//! XREADGROUP replies. Here a reply is first scanned until all of it has
//! arrived (headers only, bulk payloads skipped by their length, resumed where
//! the previous partial read stopped), then parsed once into entries.
//!
//! Only for one server over TCP or a Unix socket, and RESP2 only (we never
//! send `HELLO 3`): Cluster, and TLS should the redis crate's TLS feature be
//! enabled one day, keep redis-rs ([`ReadConn::Client`]). The
//! claimer, the commits and every other command stay on redis-rs. Error
//! replies go through redis-rs's own conversion, so `code()` is what it would
//! be there (the worker relies on `NOGROUP`).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use redis::{Cmd, ConnectionAddr, ErrorKind, RedisError, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::reply::{self as value, Batches, StreamEntry};
use crate::redis_conn::{BlockingConn, RedisTarget};

/// An entry's field/value pairs, as [`StreamEntry::fields`] holds them.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Room made in the buffer before each read: a batch of typical entries
/// (~250 bytes) arrives in a few reads rather than many small ones.
const READ_CHUNK: usize = 64 * 1024;

/// Longest header or simple line accepted: a peer that sends a line without
/// end is cut off here instead of growing the buffer until the timeout.
const MAX_LINE: usize = 1024 * 1024;

/// Elements reserved up front at most: a length announced by the reply is
/// trusted only as far as the bytes that back it.
const MAX_PREALLOC: usize = 1024;

/// The worker's connection for blocking reads: our reader where it can be
/// used, redis-rs elsewhere. Chosen once, from the target.
pub enum ReadConn {
    /// One server over TCP or a Unix socket.
    Raw(StreamReader),
    /// TLS or Cluster: redis-rs, with its `Value` tree.
    Client(BlockingConn),
}

impl ReadConn {
    /// `key`: one of the streams read, which on Cluster picks the node.
    pub fn new(target: &RedisTarget, response_timeout: Duration, key: &str) -> ReadConn {
        match StreamReader::for_target(target, response_timeout) {
            Some(reader) => ReadConn::Raw(reader),
            None => ReadConn::Client(BlockingConn::new(
                target.clone(),
                response_timeout,
                key.to_string(),
            )),
        }
    }

    /// Sends an XREADGROUP and returns its entries per stream; a timeout
    /// with nothing to read gives an empty list.
    pub async fn read(&mut self, cmd: &Cmd) -> Result<Batches, RedisError> {
        match self {
            ReadConn::Raw(reader) => reader.read(cmd).await,
            ReadConn::Client(conn) => {
                let reply: Value = cmd.query_async(conn.get().await?).await?;
                Ok(value::parse_read_reply(reply))
            }
        }
    }

    /// Forget the connection after an error; its state is unknown.
    pub fn reset(&mut self) {
        match self {
            ReadConn::Raw(reader) => reader.reset(),
            ReadConn::Client(conn) => conn.reset(),
        }
    }
}

/// A TCP or Unix socket, as one type so the round trip is written once.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// Where the one server listens.
enum Address {
    /// Host and port.
    Tcp(String, u16),
    /// Path of the socket file.
    Unix(PathBuf),
}

/// A connection to one Redis server for XREADGROUP only, opened on first use
/// and after every error.
pub struct StreamReader {
    /// Where to (re)connect.
    address: Address,
    /// `AUTH` user, when the URL names one (and a password).
    username: Option<String>,
    /// `AUTH` after connecting, when the URL has a password.
    password: Option<String>,
    /// `SELECT` after connecting, when not 0.
    db: i64,
    /// Bound of connecting and authenticating, so a dead address fails fast
    /// into the worker's backoff.
    connect_timeout: Duration,
    /// Bound of one read, above the command's BLOCK time.
    response_timeout: Duration,
    /// The open connection. Taken out for each round trip and put back only
    /// after its whole reply was parsed: after an error, or a round trip
    /// dropped half-way, there is none and the next read reconnects rather
    /// than read the rest of an old reply.
    socket: Option<Box<dyn Socket>>,
    /// The command being sent; kept to reuse its allocation.
    out: Vec<u8>,
    /// Bytes received and not yet parsed.
    frames: Frames,
}

impl StreamReader {
    /// A reader for `target`, if it is one server over TCP or a Unix socket.
    pub fn for_target(target: &RedisTarget, response_timeout: Duration) -> Option<StreamReader> {
        let info = target.single_server()?;
        let address = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Address::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => Address::Unix(path.clone()),
            _ => return None,
        };
        let settings = info.redis_settings();
        Some(StreamReader {
            address,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
            connect_timeout: target.connect_timeout(),
            response_timeout,
            socket: None,
            out: Vec::new(),
            frames: Frames::default(),
        })
    }

    /// Sends `cmd` (an XREADGROUP) and parses its reply into entries. An
    /// error reply keeps its Redis code; an I/O error, a timeout or a reply
    /// that is not RESP2 is an I/O error.
    pub async fn read(&mut self, cmd: &Cmd) -> Result<Batches, RedisError> {
        let mut socket = match self.socket.take() {
            Some(socket) => socket,
            None => self.connect().await?,
        };
        self.out.clear();
        cmd.write_packed_command(&mut self.out);
        let reply = round_trip(&mut *socket, &mut self.frames, &self.out, parse_read_reply);
        let batches = tokio::time::timeout(self.response_timeout, reply)
            .await
            .map_err(|_| timed_out("reading from Redis"))??;
        self.socket = Some(socket);
        Ok(batches)
    }

    /// Forget the connection after an error; its state is unknown.
    pub fn reset(&mut self) {
        self.socket = None;
    }

    async fn connect(&mut self) -> Result<Box<dyn Socket>, RedisError> {
        self.frames = Frames::default();
        tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| timed_out("connecting to Redis"))?
    }

    /// Opens the socket, then `AUTH` and `SELECT` as the URL asks.
    async fn open(&mut self) -> Result<Box<dyn Socket>, RedisError> {
        let mut socket: Box<dyn Socket> = match &self.address {
            Address::Tcp(host, port) => {
                let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            Address::Unix(path) => Box::new(UnixStream::connect(path).await?),
        };
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password);
            self.out.clear();
            auth.write_packed_command(&mut self.out);
            round_trip(&mut *socket, &mut self.frames, &self.out, |reply| {
                expect_ok(
                    reply,
                    ErrorKind::AuthenticationFailed,
                    "Redis refused the stream reader's password",
                )
            })
            .await?;
        }
        if self.db != 0 {
            self.out.clear();
            redis::cmd("SELECT")
                .arg(self.db)
                .write_packed_command(&mut self.out);
            round_trip(&mut *socket, &mut self.frames, &self.out, |reply| {
                expect_ok(
                    reply,
                    ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                    "Redis refused to switch the stream reader's database",
                )
            })
            .await?;
        }
        Ok(socket)
    }
}

/// Writes one command and parses its reply once all of it has arrived.
async fn round_trip<T>(
    socket: &mut dyn Socket,
    frames: &mut Frames,
    command: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, RedisError>,
) -> Result<T, RedisError> {
    socket.write_all(command).await?;
    let end = loop {
        if let Some(end) = frames.complete()? {
            break end;
        }
        frames.buf.reserve(READ_CHUNK);
        if socket.read_buf(&mut frames.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "Redis closed the connection mid-reply",
            )
            .into());
        }
    };
    let parsed = parse(&frames.buf[..end]);
    frames.buf.drain(..end);
    if !frames.buf.is_empty() {
        return Err(protocol_error("more than one reply to one command"));
    }
    parsed
}

/// A handshake reply must be `+OK`; an error reply becomes `kind` with
/// Redis's message as the detail.
fn expect_ok(reply: &[u8], kind: ErrorKind, refused: &'static str) -> Result<(), RedisError> {
    match redis::parse_redis_value(reply)? {
        Value::Okay => Ok(()),
        Value::ServerError(e) => Err((kind, refused, RedisError::from(e).to_string()).into()),
        other => Err((kind, refused, format!("unexpected reply {other:?}")).into()),
    }
}

fn timed_out(what: &str) -> RedisError {
    io::Error::new(io::ErrorKind::TimedOut, format!("timed out {what}")).into()
}

fn protocol_error(what: &str) -> RedisError {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected reply from Redis: {what}"),
    )
    .into()
}

/// An error reply (`-CODE message\r\n`) as redis-rs reports it, so `code()`
/// and the message read the same as on every other connection.
fn server_error(line: &[u8]) -> RedisError {
    match redis::parse_redis_value(line).and_then(Value::extract_error) {
        Err(e) => e,
        Ok(_) => protocol_error("an error reply that does not parse as one"),
    }
}

/// Replies as they arrive: a buffer, and how far it has been scanned, so a
/// reply split over many reads is scanned once rather than from its start
/// after each read.
#[derive(Default)]
struct Frames {
    /// Bytes received and not yet consumed.
    buf: Vec<u8>,
    /// Where the scan stopped: the start of the next header to read.
    pos: usize,
    /// Elements still to come in each aggregate the scan is inside,
    /// innermost last.
    open: Vec<usize>,
}

impl Frames {
    /// The length of the first reply in the buffer once all of it is there.
    fn complete(&mut self) -> Result<Option<usize>, RedisError> {
        loop {
            let Some((header, mut next)) = header(&self.buf, self.pos)? else {
                return Ok(None);
            };
            let children = match header {
                Header::Aggregate { elements, .. } => elements,
                Header::Bulk(len) => match payload(&self.buf, next, len)? {
                    Some((_, after)) => {
                        next = after;
                        0
                    }
                    None => return Ok(None),
                },
                Header::Nil | Header::Simple(_) | Header::Int(_) | Header::Error(_) => 0,
            };
            self.pos = next;
            if children > 0 {
                self.open.push(children);
                continue;
            }
            // A value ended: it may end the aggregates around it too.
            loop {
                match self.open.last_mut() {
                    None => {
                        let end = self.pos;
                        self.pos = 0;
                        return Ok(Some(end));
                    }
                    Some(left) if *left > 1 => {
                        *left -= 1;
                        break;
                    }
                    Some(_) => {
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// Which aggregate a header opens; only the top level of a reply tells them
/// apart, like [`value::parse_read_reply`].
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `*n`.
    Array,
    /// `~n` (RESP3).
    Set,
    /// `%n` (RESP3).
    Map,
}

/// One RESP header line.
enum Header<'a> {
    /// `*n`, `~n` or `%n`; `elements` counts a map's keys and values.
    Aggregate { elements: usize, kind: Kind },
    /// `$n`: a bulk string whose `n` bytes follow the line.
    Bulk(usize),
    /// `$-1`, `*-1` or `_`.
    Nil,
    /// `+text`.
    Simple(&'a [u8]),
    /// `:n`.
    Int(i64),
    /// `-CODE message`, the whole line with its CRLF.
    Error(&'a [u8]),
}

/// The header at `pos` and where the next element starts; `None` until its
/// line has arrived.
fn header(buf: &[u8], pos: usize) -> Result<Option<(Header<'_>, usize)>, RedisError> {
    let rest = &buf[pos..];
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        if rest.len() > MAX_LINE {
            return Err(protocol_error("a line without end"));
        }
        return Ok(None);
    };
    if nl < 2 || rest[nl - 1] != b'\r' {
        return Err(protocol_error("a line not ended by CRLF"));
    }
    let text = &rest[1..nl - 1];
    let next = pos + nl + 1;
    let header = match rest[0] {
        b'*' | b'~' | b'%' => match length(text)? {
            None => Header::Nil,
            Some(n) => {
                let kind = match rest[0] {
                    b'*' => Kind::Array,
                    b'~' => Kind::Set,
                    _ => Kind::Map,
                };
                let elements = if kind == Kind::Map {
                    n.checked_mul(2)
                        .ok_or_else(|| protocol_error("a map too large"))?
                } else {
                    n
                };
                Header::Aggregate { elements, kind }
            }
        },
        b'$' => match length(text)? {
            None => Header::Nil,
            Some(n) => Header::Bulk(n),
        },
        b'_' if text.is_empty() => Header::Nil,
        b'+' => Header::Simple(text),
        b':' => Header::Int(
            std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| protocol_error("an integer that is not one"))?,
        ),
        b'-' => Header::Error(&rest[..=nl]),
        _ => return Err(protocol_error("a type RESP2 does not have")),
    };
    Ok(Some((header, next)))
}

/// A length of `*`/`$`: `None` for `-1` (nil).
fn length(text: &[u8]) -> Result<Option<usize>, RedisError> {
    if text == b"-1" {
        return Ok(None);
    }
    if text.is_empty() || text.len() > 18 || !text.iter().all(u8::is_ascii_digit) {
        return Err(protocol_error("a length that is not one"));
    }
    Ok(Some(
        text.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')),
    ))
}

/// The `len` bytes of a bulk string at `start` and where the next element
/// starts; `None` until they and their CRLF have arrived.
fn payload(buf: &[u8], start: usize, len: usize) -> Result<Option<(&[u8], usize)>, RedisError> {
    let end = start + len;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(protocol_error("a bulk string longer than announced"));
    }
    Ok(Some((&buf[start..end], end + 2)))
}

/// One value of a complete reply, its children (if any) still to read.
enum Item<'a> {
    /// `elements` values follow (a map's keys and values both count).
    Aggregate { elements: usize, kind: Kind },
    /// `$-1`, `*-1` or `_`.
    Nil,
    /// A bulk string's bytes, borrowed from the buffer.
    Bulk(&'a [u8]),
    /// `+text`.
    Simple(&'a [u8]),
    /// `:n`.
    Int(i64),
}

impl Item<'_> {
    /// How many elements follow, for an aggregate.
    fn elements(&self) -> Option<usize> {
        match self {
            Item::Aggregate { elements, .. } => Some(*elements),
            _ => None,
        }
    }
}

/// Reads the values of one complete reply in order.
struct Cursor<'a> {
    /// The reply, whole ([`Frames::complete`] said so).
    buf: &'a [u8],
    /// Start of the next value.
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The next value; an error reply anywhere fails the whole reply, as
    /// redis-rs's `extract_error` does.
    fn next(&mut self) -> Result<Item<'a>, RedisError> {
        let truncated = || protocol_error("a reply shorter than its headers");
        let (header, next) = header(self.buf, self.pos)?.ok_or_else(truncated)?;
        self.pos = next;
        Ok(match header {
            Header::Aggregate { elements, kind } => Item::Aggregate { elements, kind },
            Header::Bulk(len) => {
                let (bytes, after) = payload(self.buf, next, len)?.ok_or_else(truncated)?;
                self.pos = after;
                Item::Bulk(bytes)
            }
            Header::Nil => Item::Nil,
            Header::Simple(text) => Item::Simple(text),
            Header::Int(n) => Item::Int(n),
            Header::Error(line) => return Err(server_error(line)),
        })
    }

    /// Skips `n` values, with their children.
    fn skip(&mut self, mut n: usize) -> Result<(), RedisError> {
        while n > 0 {
            n -= 1;
            n += self.next()?.elements().unwrap_or(0);
        }
        Ok(())
    }

    /// A stream name or entry id; anything else is skipped and gives `None`.
    fn text(&mut self, item: Item<'_>) -> Result<Option<String>, RedisError> {
        Ok(match item {
            Item::Bulk(b) | Item::Simple(b) => String::from_utf8(b.to_vec()).ok(),
            Item::Aggregate { elements, .. } => {
                self.skip(elements)?;
                None
            }
            Item::Nil | Item::Int(_) => None,
        })
    }

    /// A field name or value; anything but a string or an integer is
    /// skipped and gives `None`.
    fn bytes(&mut self, item: Item<'_>) -> Result<Option<Vec<u8>>, RedisError> {
        Ok(match item {
            Item::Bulk(b) | Item::Simple(b) => Some(b.to_vec()),
            Item::Int(n) => Some(n.to_string().into_bytes()),
            Item::Aggregate { elements, .. } => {
                self.skip(elements)?;
                None
            }
            Item::Nil => None,
        })
    }

    /// `[[id, [field, value, …] | nil], …]`, as
    /// [`value::parse_entries`] reads it.
    fn entries(&mut self, item: Item<'_>) -> Result<Vec<StreamEntry>, RedisError> {
        let Some(n) = item.elements() else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::with_capacity(n.min(MAX_PREALLOC));
        for _ in 0..n {
            let Some(parts) = self.next()?.elements() else {
                continue;
            };
            if parts == 0 {
                continue;
            }
            let id = self.next()?;
            let id = self.text(id)?;
            let fields = if parts >= 2 {
                let fields = self.next()?;
                self.fields(fields)?
            } else {
                None
            };
            self.skip(parts.saturating_sub(2))?;
            if let Some(id) = id {
                entries.push(StreamEntry { id, fields });
            }
        }
        Ok(entries)
    }

    /// An entry's `[field, value, …]`; nil when it was deleted while pending.
    fn fields(&mut self, item: Item<'_>) -> Result<Option<Fields>, RedisError> {
        let n = match item {
            Item::Nil => return Ok(None),
            Item::Aggregate { elements, .. } => elements,
            Item::Bulk(_) | Item::Simple(_) | Item::Int(_) => return Ok(Some(Vec::new())),
        };
        let mut pairs = Vec::with_capacity((n / 2).min(MAX_PREALLOC));
        for _ in 0..n / 2 {
            let field = self.next()?;
            let field = self.bytes(field)?;
            let value = self.next()?;
            let value = self.bytes(value)?;
            if let (Some(field), Some(value)) = (field, value) {
                pairs.push((field, value));
            }
        }
        self.skip(n % 2)?;
        Ok(Some(pairs))
    }
}

/// Parses one complete XREADGROUP reply into (stream, entries) pairs, like
/// [`value::parse_read_reply`] on redis-rs's `Value` of the same bytes:
/// nil (timeout) gives nothing, shapes it skips are skipped.
fn parse_read_reply(reply: &[u8]) -> Result<Batches, RedisError> {
    let mut c = Cursor { buf: reply, pos: 0 };
    let mut batches = Vec::new();
    match c.next()? {
        Item::Aggregate {
            elements,
            kind: Kind::Map,
        } => {
            for _ in 0..elements / 2 {
                let name = c.next()?;
                let name = c.text(name)?;
                let entries = c.next()?;
                let entries = c.entries(entries)?;
                if let Some(name) = name {
                    batches.push((name, entries));
                }
            }
        }
        Item::Aggregate {
            elements,
            kind: Kind::Array,
        } => {
            for _ in 0..elements {
                let Some(parts) = c.next()?.elements() else {
                    continue;
                };
                if parts < 2 {
                    c.skip(parts)?;
                    continue;
                }
                let name = c.next()?;
                let name = c.text(name)?;
                let entries = c.next()?;
                let entries = c.entries(entries)?;
                c.skip(parts - 2)?;
                if let Some(name) = name {
                    batches.push((name, entries));
                }
            }
        }
        Item::Aggregate {
            elements,
            kind: Kind::Set,
        } => c.skip(elements)?,
        Item::Nil | Item::Bulk(_) | Item::Simple(_) | Item::Int(_) => {}
    }
    if c.pos != reply.len() {
        return Err(protocol_error("bytes after the reply"));
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_conn::RedisEndpoint;
    use tokio::net::TcpListener;

    /// A reply to encode: every shape XREADGROUP gives, and a few it does not.
    enum R {
        Array(Vec<R>),
        Map(Vec<(R, R)>),
        Set(Vec<R>),
        Bulk(Vec<u8>),
        NilBulk,
        NilArray,
        Null,
        Int(i64),
        Simple(&'static str),
        Error(&'static str),
    }

    fn bulk(b: impl AsRef<[u8]>) -> R {
        R::Bulk(b.as_ref().to_vec())
    }

    fn encode(r: &R, out: &mut Vec<u8>) {
        match r {
            R::Array(items) | R::Set(items) => {
                let t = if matches!(r, R::Array(_)) { '*' } else { '~' };
                out.extend(format!("{t}{}\r\n", items.len()).bytes());
                items.iter().for_each(|i| encode(i, out));
            }
            R::Map(pairs) => {
                out.extend(format!("%{}\r\n", pairs.len()).bytes());
                for (k, v) in pairs {
                    encode(k, out);
                    encode(v, out);
                }
            }
            R::Bulk(b) => {
                out.extend(format!("${}\r\n", b.len()).bytes());
                out.extend(b);
                out.extend(b"\r\n");
            }
            R::NilBulk => out.extend(b"$-1\r\n"),
            R::NilArray => out.extend(b"*-1\r\n"),
            R::Null => out.extend(b"_\r\n"),
            R::Int(n) => out.extend(format!(":{n}\r\n").bytes()),
            R::Simple(s) => out.extend(format!("+{s}\r\n").bytes()),
            R::Error(s) => out.extend(format!("-{s}\r\n").bytes()),
        }
    }

    fn entry(id: &str, fields: &[(&[u8], &[u8])]) -> R {
        let flat = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect();
        R::Array(vec![bulk(id), R::Array(flat)])
    }

    /// An entry as the shipped setup writes it: id and 3 field/value pairs.
    fn watermill(id: &str) -> R {
        entry(
            id,
            &[
                (
                    b"_watermill_message_uuid",
                    b"00000000-0000-4000-8000-000000000001",
                ),
                (b"metadata", b"\x81\xa6source\xa4test"),
                (
                    b"payload",
                    br#"{"hostname":"core-1","interface":"et-0/0/1","input_errors":12000}"#,
                ),
            ],
        )
    }

    fn stream(name: &str, entries: Vec<R>) -> R {
        R::Array(vec![bulk(name), R::Array(entries)])
    }

    fn cases() -> Vec<(&'static str, R)> {
        let binary: Vec<u8> = (0..=255u8).chain(*b"\r\n$3\r\n*-1\r\n").collect();
        vec![
            ("timeout", R::NilArray),
            ("no streams", R::Array(vec![])),
            (
                "one entry",
                R::Array(vec![stream("s", vec![watermill("1-0")])]),
            ),
            (
                "several streams, one drained",
                R::Array(vec![
                    stream("a", vec![watermill("1-0"), watermill("1-1")]),
                    stream("b", vec![]),
                    stream("c", vec![watermill("7-0")]),
                ]),
            ),
            (
                "deleted while pending",
                R::Array(vec![stream(
                    "s",
                    vec![
                        R::Array(vec![bulk("1-0"), R::NilArray]),
                        watermill("2-0"),
                        R::Array(vec![bulk("3-0"), R::NilBulk]),
                        R::Array(vec![bulk("4-0")]),
                    ],
                )]),
            ),
            (
                "binary values",
                R::Array(vec![stream(
                    "s",
                    vec![entry(
                        "1-0",
                        &[(b"k\r\n", &binary), (b"", b""), (b"*2\r\n", b"-ERR x\r\n")],
                    )],
                )]),
            ),
            (
                "large value",
                R::Array(vec![stream(
                    "s",
                    vec![entry("1-0", &[(b"big", &vec![b'x'; 200_000])])],
                )]),
            ),
            (
                "a full batch",
                R::Array(vec![stream(
                    "s",
                    (0..500).map(|i| watermill(&format!("{i}-0"))).collect(),
                )]),
            ),
            (
                "no group",
                R::Error(
                    "NOGROUP No such key 's' or consumer group 'g' in XREADGROUP with GROUP option",
                ),
            ),
            ("plain error", R::Error("ERR wrong number of arguments")),
            (
                "error inside",
                R::Array(vec![stream("s", vec![watermill("1-0")]), R::Error("ERR x")]),
            ),
            (
                "map of streams",
                R::Map(vec![
                    (bulk("a"), R::Array(vec![watermill("1-0")])),
                    (bulk("b"), R::Array(vec![])),
                ]),
            ),
            ("odd shapes", odd_shapes()),
            ("set", R::Set(vec![stream("s", vec![watermill("1-0")])])),
            ("string", bulk("OK")),
        ]
    }

    /// Replies no Redis sends, which must still neither panic nor differ
    /// from redis-rs: names that are not strings, entries without fields,
    /// fields of odd types and counts.
    fn odd_shapes() -> R {
        R::Array(vec![
            R::Array(vec![bulk("only a name")]),
            R::Int(3),
            R::Null,
            R::Array(vec![R::Int(1), R::Array(vec![watermill("1-0")])]),
            R::Array(vec![bulk(b"\xff"), R::Array(vec![watermill("1-0")])]),
            R::Array(vec![
                R::Simple("t"),
                R::Array(vec![
                    R::NilArray,
                    R::Array(vec![]),
                    R::Array(vec![R::Array(vec![]), R::Array(vec![])]),
                    R::Array(vec![bulk(b"\xfe"), R::Array(vec![])]),
                    R::Array(vec![bulk("2-0"), bulk("not fields"), bulk("extra")]),
                    R::Array(vec![
                        bulk("3-0"),
                        R::Array(vec![
                            bulk("n"),
                            R::Int(-42),
                            R::Simple("s"),
                            R::Simple("v"),
                            R::Array(vec![bulk("nested")]),
                            bulk("dropped"),
                            bulk("k"),
                            R::NilBulk,
                            bulk("odd one out"),
                        ]),
                    ]),
                ]),
                bulk("extra"),
            ]),
            R::Set(vec![bulk("x")]),
        ])
    }

    /// What redis-rs makes of the same bytes.
    fn expected(bytes: &[u8]) -> Result<Batches, RedisError> {
        redis::parse_redis_value(bytes)
            .and_then(Value::extract_error)
            .map(value::parse_read_reply)
    }

    fn assert_same(
        name: &str,
        ours: &Result<Batches, RedisError>,
        theirs: &Result<Batches, RedisError>,
    ) {
        match (ours, theirs) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}"),
            (Err(a), Err(b)) => {
                assert_eq!(a.code(), b.code(), "{name}");
                assert_eq!(a.kind(), b.kind(), "{name}");
                assert_eq!(a.to_string(), b.to_string(), "{name}");
            }
            _ => panic!("{name}: ours {ours:?}, redis-rs {theirs:?}"),
        }
    }

    /// Scans `bytes` arriving in the given pieces; the reply is complete
    /// only with the last byte.
    fn scan_in_pieces(name: &str, bytes: &[u8], cuts: impl IntoIterator<Item = usize>) -> Frames {
        let mut frames = Frames::default();
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            if cut < from {
                continue;
            }
            frames.buf.extend_from_slice(&bytes[from..cut]);
            from = cut;
            let done = frames.complete().unwrap();
            if cut < bytes.len() {
                assert_eq!(
                    done,
                    None,
                    "{name}: complete after {cut} of {} bytes",
                    bytes.len()
                );
            } else {
                assert_eq!(done, Some(bytes.len()), "{name}");
            }
        }
        frames
    }

    #[test]
    fn every_shape_split_at_every_byte_reads_like_redis_rs() {
        for (name, reply) in cases() {
            let mut bytes = Vec::new();
            encode(&reply, &mut bytes);
            let theirs = expected(&bytes);
            if name == "no streams" || name.contains("entry") || name.contains("batch") {
                assert!(
                    theirs.as_ref().is_ok_and(|b| b.len() <= 1),
                    "{name}: {theirs:?}"
                );
            }
            // Every boundary in turn, scanning on from where it stopped.
            let frames = scan_in_pieces(name, &bytes, 1..bytes.len());
            assert_same(name, &parse_read_reply(&frames.buf), &theirs);
            // Two pieces, cut at every boundary (a stride on large replies).
            let stride = if bytes.len() > 4096 { 997 } else { 1 };
            for cut in (0..bytes.len()).step_by(stride) {
                let frames = scan_in_pieces(name, &bytes, [cut]);
                assert_same(name, &parse_read_reply(&frames.buf), &theirs);
            }
        }
    }

    #[test]
    fn deleted_entries_have_no_fields_and_errors_keep_their_code() {
        let mut bytes = Vec::new();
        encode(
            &R::Array(vec![stream(
                "s",
                vec![R::Array(vec![bulk("1-0"), R::NilArray])],
            )]),
            &mut bytes,
        );
        let batches = parse_read_reply(&bytes).unwrap();
        assert_eq!(
            batches[0].1,
            vec![StreamEntry {
                id: "1-0".into(),
                fields: None
            }]
        );
        let e = parse_read_reply(b"-NOGROUP No such key\r\n").unwrap_err();
        assert_eq!(e.code(), Some("NOGROUP"));
        assert!(parse_read_reply(b"*-1\r\n").unwrap().is_empty());
    }

    #[test]
    fn protocol_violations_are_io_errors() {
        for bad in [
            &b"!3\r\nabc\r\n"[..],
            b"$3\r\nabcd\r\n",
            b"*x\r\n",
            b"*-2\r\n",
            b"$3\nabc\r\n",
            b":1.5\r\n",
        ] {
            let mut frames = Frames::default();
            frames.buf.extend_from_slice(bad);
            let e = frames.complete().map(|_| ()).unwrap_err();
            assert!(e.is_io_error(), "{:?}: {e:?}", String::from_utf8_lossy(bad));
        }
        let mut frames = Frames {
            buf: vec![b'+'; MAX_LINE + 2],
            ..Frames::default()
        };
        assert!(frames.complete().is_err());
    }

    fn reader_for(port: u16, response_timeout: Duration) -> StreamReader {
        let endpoint = RedisEndpoint::parse(&format!("127.0.0.1:{port}")).unwrap();
        let target = RedisTarget::new(&endpoint, Duration::from_secs(1)).unwrap();
        StreamReader::for_target(&target, response_timeout).unwrap()
    }

    fn xreadgroup() -> Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("s")
            .arg(">");
        cmd
    }

    #[tokio::test]
    async fn a_reply_trickling_in_is_read_and_the_socket_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut reply = Vec::new();
        encode(
            &R::Array(vec![stream("s", vec![watermill("1-0")])]),
            &mut reply,
        );
        let expected = expected(&reply).unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let command = xreadgroup().get_packed_command();
            let mut request = vec![0; command.len()];
            for _ in 0..2 {
                socket.read_exact(&mut request).await.unwrap();
                assert_eq!(request, command);
                for chunk in reply.chunks(7) {
                    socket.write_all(chunk).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        let mut reader = reader_for(port, Duration::from_secs(5));
        assert_eq!(reader.read(&xreadgroup()).await.unwrap(), expected);
        assert_eq!(reader.read(&xreadgroup()).await.unwrap(), expected);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unix_socket_addresses_are_read_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redis.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0; xreadgroup().get_packed_command().len()];
            socket.read_exact(&mut request).await.unwrap();
            socket.write_all(b"*-1\r\n").await.unwrap();
        });
        let endpoint = RedisEndpoint::parse(&format!("unix://{}", path.display())).unwrap();
        let target = RedisTarget::new(&endpoint, Duration::from_secs(1)).unwrap();
        let mut reader = StreamReader::for_target(&target, Duration::from_secs(5)).unwrap();
        assert!(reader.read(&xreadgroup()).await.unwrap().is_empty());
        server.await.unwrap();
    }

    #[test]
    fn cluster_stays_on_redis_rs() {
        let endpoint = RedisEndpoint::parse("redis+cluster://127.0.0.1:1").unwrap();
        let target = RedisTarget::new(&endpoint, Duration::from_secs(1)).unwrap();
        assert!(matches!(
            ReadConn::new(&target, Duration::from_secs(1), "s"),
            ReadConn::Client(_)
        ));
    }

    #[tokio::test]
    async fn silence_times_out_and_a_cut_reply_fails_then_the_reader_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut request = vec![0; xreadgroup().get_packed_command().len()];
            // Reads the command and never answers.
            let (mut silent, _) = listener.accept().await.unwrap();
            silent.read_exact(&mut request).await.unwrap();
            // Answers half a reply and hangs up.
            let (mut cut, _) = listener.accept().await.unwrap();
            cut.read_exact(&mut request).await.unwrap();
            cut.write_all(b"*1\r\n*2\r\n$1\r\ns").await.unwrap();
            drop(cut);
            // Answers properly.
            let (mut good, _) = listener.accept().await.unwrap();
            good.read_exact(&mut request).await.unwrap();
            good.write_all(b"*-1\r\n").await.unwrap();
            silent
        });
        let mut reader = reader_for(port, Duration::from_millis(200));
        let e = reader.read(&xreadgroup()).await.unwrap_err();
        assert!(e.is_io_error() && e.is_timeout(), "{e:?}");
        let e = reader.read(&xreadgroup()).await.unwrap_err();
        assert!(e.is_io_error(), "{e:?}");
        assert!(reader.read(&xreadgroup()).await.unwrap().is_empty());
        server.await.unwrap();
    }
}
