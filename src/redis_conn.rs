//! Redis connections: one place that knows about reply timeouts, reconnect
//! backoff, single server versus Cluster, and whether Redis is up and keeps
//! its data. Reading streams through a consumer group is
//! [`crate::group_reader`]'s.
//!
//! A blocking read (XREADGROUP BLOCK) holds up every command behind it on its
//! socket, so each blocking reader gets a connection of its own
//! ([`BlockingConn`]) with a reply timeout above its block time. Everything
//! else an instance sends (commits, acks, claims, timers, outbox writes,
//! lease, cleanup, status reads) shares one multiplexed connection per
//! [`RedisTarget`] ([`LazyConn`]), except the health check, which must not
//! wait behind that traffic ([`watch_health`]), and the two tasks that read
//! the whole alert state, whose large replies must not hold that traffic up
//! ([`LazyConn::own`]). The connections an instance holds on a server are
//! its blocking readers plus four, however many hash tags it works on
//! (docs/scaling.md).
//!
//! On Redis Cluster the shared connection ([`RedisConn::Cluster`]) holds one
//! socket per node, routes each command by its key's hash slot, follows
//! MOVED/ASK and reconnects to failed-over nodes by itself. A command over
//! several keys must stay in one slot, so a blocking read covers only the
//! streams of one hash tag ([`RedisTarget::read_groups`]), and its connection
//! goes to the one node serving that slot.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, Pipeline, RedisError, RedisFuture, TlsCertificates, Value,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::keys::hash_tag;
use crate::metrics::{self, Metrics, NodePersistence, Persistence};

/// Scheme of a Cluster address: `redis+cluster://host:port,host:port`.
const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Reply timeout of the shared connection. On Cluster it also bounds the
/// retries of a command while a failover moves its slot. Callers that must
/// answer sooner (HTTP requests, the health check) bound their own wait.
const SHARED_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where Redis is, as the user wrote it: one server, or seed nodes of a
/// Redis Cluster (the rest of the cluster is discovered from them).
#[derive(Debug, Clone, PartialEq)]
pub enum RedisEndpoint {
    /// A URL the redis crate opens: `redis://…`, `rediss://…`, `unix://…`.
    Single(String),
    /// `redis://[user:password@]host:port/` of each seed node.
    Cluster(Vec<String>),
}

impl RedisEndpoint {
    /// Parses every address form tripline accepts: the seed's bare
    /// `host:port`, a `redis://`, `rediss://` or `unix://` URL, or
    /// `redis+cluster://[user:password@]host:port[,host:port…]`.
    pub fn parse(addr: &str) -> Result<RedisEndpoint, String> {
        let addr = addr.trim();
        let Some(rest) = addr.strip_prefix(CLUSTER_SCHEME) else {
            let url = if addr.contains("://") {
                addr.to_string()
            } else {
                host_port_url(addr, "")?
            };
            Client::open(url.as_str())
                .map_err(|e| format!("Redis address `{addr}` is not usable: {e}"))?;
            return Ok(RedisEndpoint::Single(url));
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), rest),
        };
        let seeds = hosts
            .split(',')
            .map(|h| host_port_url(h.trim(), &userinfo))
            .collect::<Result<Vec<_>, _>>()?;
        RedisEndpoint::cluster(seeds)
    }

    /// A Cluster from seed nodes, each `host:port` or a `redis://` URL.
    pub fn cluster_of(seeds: &[String]) -> Result<RedisEndpoint, String> {
        let urls = seeds
            .iter()
            .map(|s| {
                let s = s.trim();
                if s.contains("://") {
                    Ok(s.to_string())
                } else {
                    host_port_url(s, "")
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        RedisEndpoint::cluster(urls)
    }

    fn cluster(urls: Vec<String>) -> Result<RedisEndpoint, String> {
        if urls.is_empty() {
            return Err("a Redis Cluster needs at least one seed node".into());
        }
        ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .build()
            .map_err(|e| format!("Redis Cluster seed nodes are not usable: {e}"))?;
        Ok(RedisEndpoint::Cluster(urls))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisEndpoint::Cluster(_))
    }
}

/// `redis://<userinfo>host:port/` from a bare `host:port`.
fn host_port_url(addr: &str, userinfo: &str) -> Result<String, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("Redis address `{addr}` is neither host:port nor a URL"))?;
    port.parse::<u16>()
        .map_err(|_| format!("Redis address `{addr}`: `{port}` is not a port number"))?;
    if host.is_empty() {
        return Err(format!("Redis address `{addr}` has no host"));
    }
    Ok(format!("redis://{userinfo}{addr}/"))
}

/// For logs: the address with passwords hidden.
impl fmt::Display for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisEndpoint::Single(url) => f.write_str(&redact(url)),
            RedisEndpoint::Cluster(seeds) => {
                let seeds: Vec<String> = seeds.iter().map(|s| redact(s)).collect();
                write!(f, "cluster {}", seeds.join(","))
            }
        }
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let user = cred.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Where Redis is, plus how long a connection attempt may take.
#[derive(Clone)]
pub struct RedisTarget {
    /// The client of a single server, or the seed nodes of a Cluster.
    kind: TargetKind,
    /// Bound of one connection attempt (per node on Cluster), so a dead
    /// address fails fast into the caller's backoff.
    connect_timeout: Duration,
    /// The connection every clone of this target shares for its
    /// non-blocking commands, so their number does not grow with the tasks.
    shared: Arc<SharedSlot>,
}

/// The shared connection of a [`RedisTarget`], opened on first use and
/// replaced after an error.
#[derive(Default)]
struct SharedSlot {
    /// The open connection and its generation (which opening it came from),
    /// if any. Locked only to clone or swap it, never across an await.
    current: Mutex<Option<(u64, RedisConn)>>,
    /// Held while opening; counts the openings, which numbers generations.
    /// Tasks that find no connection wait for one attempt instead of each
    /// opening a connection of their own.
    opening: tokio::sync::Mutex<u64>,
    /// Failed openings so far: a task that waited through another task's
    /// failed attempt returns at once into its backoff rather than try
    /// again right away (each attempt may take the whole connect timeout).
    failures: AtomicU64,
}

#[derive(Clone)]
enum TargetKind {
    /// Opens multiplexed connections to the one server. Boxed: with its
    /// TLS settings a client is several times the size of a seed list.
    Single(Box<Client>),
    /// A Cluster client is built per connection: its reply timeout (which
    /// also bounds its retries across a failover) is a client setting.
    Cluster(Vec<ConnectionInfo>),
}

impl RedisTarget {
    pub fn new(
        endpoint: &RedisEndpoint,
        connect_timeout: Duration,
    ) -> Result<RedisTarget, RedisError> {
        let kind = match endpoint {
            RedisEndpoint::Single(url) => TargetKind::Single(Box::new(Client::open(url.as_str())?)),
            RedisEndpoint::Cluster(seeds) => TargetKind::Cluster(
                seeds
                    .iter()
                    .map(|s| s.as_str().into_connection_info())
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(RedisTarget {
            kind,
            connect_timeout,
            shared: Arc::default(),
        })
    }

    /// Trusts the CA certificates in `ca_pem` (PEM) instead of the system's
    /// roots for a `rediss://` server: a Redis behind a private CA then needs
    /// no change to the host's trust store. One server only.
    pub fn with_tls_ca(self, ca_pem: Vec<u8>) -> Result<RedisTarget, RedisError> {
        let TargetKind::Single(client) = &self.kind else {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a TLS CA file is supported for a single Redis server, not a Cluster",
            )));
        };
        let certificates = TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem),
        };
        let client = Client::build_with_tls(client.get_connection_info().clone(), certificates)?;
        Ok(RedisTarget {
            kind: TargetKind::Single(Box::new(client)),
            connect_timeout: self.connect_timeout,
            shared: Arc::default(),
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, TargetKind::Cluster(_))
    }

    /// Address and credentials of the one server; `None` on Cluster. For
    /// connections tripline opens itself ([`crate::group_reader::fast`]).
    pub fn single_server(&self) -> Option<&ConnectionInfo> {
        match &self.kind {
            TargetKind::Single(client) => Some(client.get_connection_info()),
            TargetKind::Cluster(_) => None,
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// A connection whose replies (a blocking read included) time out after
    /// `response_timeout`. On Cluster the same bound covers the retries a
    /// command makes while a failover moves its slot.
    pub async fn connect(&self, response_timeout: Duration) -> Result<RedisConn, RedisError> {
        match &self.kind {
            TargetKind::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(RedisConn::Single(conn))
            }
            TargetKind::Cluster(seeds) => {
                let conn = ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(response_timeout)
                    .build()?
                    .get_async_connection()
                    .await?;
                Ok(RedisConn::Cluster(conn))
            }
        }
    }

    /// The shared connection and its generation, opened if there is none.
    /// Hand the generation to [`RedisTarget::forget_shared`] after an
    /// error, so the next user opens a new one.
    pub async fn shared(&self) -> Result<(u64, RedisConn), RedisError> {
        if let Some(held) = self.current_shared() {
            return Ok(held);
        }
        let failures = self.shared.failures.load(Ordering::SeqCst);
        let mut openings = self.shared.opening.lock().await;
        if let Some(held) = self.current_shared() {
            return Ok(held);
        }
        if self.shared.failures.load(Ordering::SeqCst) != failures {
            return Err(RedisError::from((
                ErrorKind::Io,
                "connecting to Redis failed just now",
            )));
        }
        match self.connect(SHARED_REPLY_TIMEOUT).await {
            Ok(conn) => {
                *openings += 1;
                let held = (*openings, conn);
                *self.shared.current.lock().expect("not poisoned") = Some(held.clone());
                Ok(held)
            }
            Err(e) => {
                self.shared.failures.fetch_add(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn current_shared(&self) -> Option<(u64, RedisConn)> {
        self.shared.current.lock().expect("not poisoned").clone()
    }

    /// Drops the shared connection of `generation` after an error: its state
    /// is unknown. A newer one (another user's error came first) is kept.
    /// Commands in flight on the old one still get their replies.
    pub fn forget_shared(&self, generation: u64) {
        let mut current = self.shared.current.lock().expect("not poisoned");
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// Runs `f` on the shared connection, waiting at most `limit` (less than
    /// the connection's own reply timeout: someone waits for the answer).
    /// An error other than Redis refusing the command drops the connection
    /// for every user.
    pub async fn with_shared<T>(
        &self,
        limit: Duration,
        f: impl AsyncFnOnce(&mut RedisConn) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let (generation, mut conn) = self.shared().await?;
        let result = within(limit, f(&mut conn)).await;
        if result.as_ref().is_err_and(|e| !is_refusal(e)) {
            self.forget_shared(generation);
        }
        result
    }

    /// Address of the master serving `key`'s hash slot, as the shared
    /// Cluster connection knows it (from its own view of the slots, which it
    /// refreshes after MOVED and failed nodes).
    async fn master_of(&self, key: &str) -> Result<(String, u16), RedisError> {
        let (generation, conn) = self.shared().await?;
        let found = match conn {
            RedisConn::Cluster(mut cluster) => master_serving(&mut cluster, key).await,
            RedisConn::Single(_) => Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a single Redis server has no hash slots",
            ))),
        };
        if found.as_ref().is_err_and(|e| !is_refusal(e)) {
            self.forget_shared(generation);
        }
        found
    }

    /// A synchronous connection, for the command-line tools that read in a
    /// plain loop (`tripline record`).
    pub fn connect_blocking(&self) -> Result<Box<dyn redis::ConnectionLike>, RedisError> {
        match &self.kind {
            TargetKind::Single(client) => Ok(Box::new(
                client.get_connection_with_timeout(self.connect_timeout)?,
            )),
            TargetKind::Cluster(seeds) => Ok(Box::new(
                ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(self.connect_timeout)
                    .build()?
                    .get_connection()?,
            )),
        }
    }

    /// Splits `streams` into the sets one XREADGROUP may name: all of them
    /// on a single server; on Cluster, the streams sharing a hash tag (the
    /// keys of one command must share a slot). Order is kept within a set.
    pub fn read_groups(&self, streams: &[String]) -> Vec<Vec<String>> {
        if !self.is_cluster() {
            return vec![streams.to_vec()];
        }
        let mut by_tag: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for s in streams {
            by_tag.entry(hash_tag(s)).or_default().push(s.clone());
        }
        by_tag.into_values().collect()
    }
}

/// A connection to one Redis server or to a whole Cluster. Both kinds are
/// multiplexed: clones share the underlying sockets.
#[derive(Clone)]
pub enum RedisConn {
    /// One socket to the one server.
    Single(MultiplexedConnection),
    /// Holds a connection per cluster node and routes by hash slot.
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Exponential backoff with full jitter, capped; reset after a success.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            base,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: spreads reconnect storms without ever
        // retrying immediately.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// One task's use of its target's shared connection ([`RedisTarget::shared`]):
/// opened on first use, and after an error dropped for every user, so the
/// next use (this task's or another's) reconnects. Never for a blocking
/// command, which would hold up everyone else's ([`BlockingConn`]).
pub struct LazyConn {
    target: RedisTarget,
    /// The connection handed out last, with its generation (0 for one of
    /// this task's own).
    conn: Option<(u64, RedisConn)>,
    /// `Some(reply timeout)`: this task's own connection, not the shared
    /// one (see [`LazyConn::own`]).
    own: Option<Duration>,
}

impl LazyConn {
    pub fn new(target: RedisTarget) -> LazyConn {
        LazyConn {
            target,
            conn: None,
            own: None,
        }
    }

    /// A connection of the task's own, for commands with large replies
    /// (the timers' full read of the alert state: megabytes with tens of
    /// thousands of alerts). On the shared connection such a reply holds up
    /// every command queued behind it: measured at 5,000 alerting readings/s,
    /// p99 from XADD to the sink went from 33 ms to 220–310 ms.
    pub fn own(target: RedisTarget, response_timeout: Duration) -> LazyConn {
        LazyConn {
            target,
            conn: None,
            own: Some(response_timeout),
        }
    }

    /// The shared connection now (a newer one than last time if another
    /// user replaced it meanwhile), or the task's own.
    pub async fn get(&mut self) -> Result<&mut RedisConn, RedisError> {
        if let Some(timeout) = self.own {
            if self.conn.is_none() {
                self.conn = Some((0, self.target.connect(timeout).await?));
            }
            return Ok(&mut self.conn.as_mut().expect("just set").1);
        }
        let (_, conn) = self.conn.insert(self.target.shared().await?);
        Ok(conn)
    }

    /// Forget the connection after an error; its state is unknown.
    pub fn reset(&mut self) {
        if let Some((generation, _)) = self.conn.take()
            && self.own.is_none()
        {
            self.target.forget_shared(generation);
        }
    }
}

/// A blocking reader's own connection, opened on first use and dropped after
/// an error. On Cluster it goes to the one master serving `key`'s hash slot
/// (every key of one blocking read shares it), found again after every
/// error, so a failover or a moved slot sends it to the new master.
pub struct BlockingConn {
    target: RedisTarget,
    /// Above the reads' block time.
    response_timeout: Duration,
    /// A key the reads name, for the slot on Cluster.
    key: String,
    conn: Option<RedisConn>,
}

impl BlockingConn {
    pub fn new(target: RedisTarget, response_timeout: Duration, key: String) -> BlockingConn {
        BlockingConn {
            target,
            response_timeout,
            key,
            conn: None,
        }
    }

    pub async fn get(&mut self) -> Result<&mut RedisConn, RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.open().await?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    async fn open(&self) -> Result<RedisConn, RedisError> {
        let TargetKind::Cluster(seeds) = &self.target.kind else {
            return self.target.connect(self.response_timeout).await;
        };
        let (host, port) = self.target.master_of(&self.key).await?;
        let info = node_info(&seeds[0], host, port)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.target.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let conn = Client::open(info)?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(RedisConn::Single(conn))
    }

    /// Forget the connection after an error; its state is unknown.
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// The master serving `key`'s slot: `CLUSTER MYID` of the node the
/// connection routes the slot to, matched against that of every master (the
/// reply names each by the address the connection uses for it).
async fn master_serving(
    conn: &mut ClusterConnection,
    key: &str,
) -> Result<(String, u16), RedisError> {
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await?;
    let mut myid = redis::cmd("CLUSTER");
    myid.arg("MYID");
    let owner = Route::new(slot, SlotAddr::Master);
    let id = conn
        .route_command(
            myid.clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(owner)),
        )
        .await?;
    let mut all = RedisConn::Cluster(conn.clone());
    for (node, reply) in ask_every_node(&mut all, &myid).await? {
        if reply.ok().and_then(text) == text(id.clone())
            && let Some((host, port)) = node.rsplit_once(':')
            && let Ok(port) = port.parse()
        {
            return Ok((host.to_string(), port));
        }
    }
    Err(RedisError::from((
        ErrorKind::ClusterConnectionNotFound,
        "no master known for the slot of a stream",
        key.to_string(),
    )))
}

/// The address of a Cluster node with the credentials and TLS settings of a
/// seed, as the Cluster connection itself connects to nodes.
fn node_info(seed: &ConnectionInfo, host: String, port: u16) -> Result<ConnectionInfo, RedisError> {
    let addr = match seed.addr() {
        ConnectionAddr::Tcp(..) => ConnectionAddr::Tcp(host, port),
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a Redis Cluster node must be reached over TCP",
            )));
        }
    };
    Ok(seed.clone().set_addr(addr))
}

/// Every field and value of hash `key`, by [`HashScan`].
pub async fn scan_hash(
    conn: &mut RedisConn,
    key: &str,
) -> Result<Vec<(String, String)>, RedisError> {
    let mut scan = HashScan::new(key);
    let mut fields = Vec::new();
    while let Some(page) = scan.next(conn).await? {
        fields.extend(page);
    }
    Ok(fields)
}

/// The fields and values of a hash, a thousand at a time (HSCAN): one
/// HGETALL of a large hash (a deadman watch per router) holds Redis, and
/// every client of it, for tens of milliseconds. A field may come twice if
/// the hash changes meanwhile.
pub struct HashScan<'a> {
    key: &'a str,
    /// Where the next page starts; `None` once the last page was read.
    cursor: Option<u64>,
}

impl<'a> HashScan<'a> {
    pub fn new(key: &'a str) -> HashScan<'a> {
        HashScan {
            key,
            cursor: Some(0),
        }
    }

    /// The next page, `None` after the last.
    pub async fn next(
        &mut self,
        conn: &mut RedisConn,
    ) -> Result<Option<Vec<(String, String)>>, RedisError> {
        let Some(cursor) = self.cursor else {
            return Ok(None);
        };
        let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(self.key)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        self.cursor = (next != 0).then_some(next);
        Ok(Some(page))
    }
}

pub async fn pause(backoff: &mut Backoff, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.next_delay()) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Records an error from Redis: a server error reply is the command's fault;
/// anything else is a failed connection, which the task only reports at
/// debug level and hands to [`watch_health`]: every task notices an outage
/// (and a stale connection after it) on its own, the watcher logs it once.
pub fn note_error(what: &str, e: &RedisError) {
    if e.kind() == redis::ErrorKind::Client {
        // Raised by the client library before anything was sent (bad
        // arguments, …): retried like a Redis error, but Redis itself is fine.
        tracing::warn!(during = what, "{e}; retrying");
    } else if is_refusal(e) {
        tracing::warn!(during = what, "Redis refused a command: {e}");
    } else {
        tracing::debug!(during = what, "Redis connection failed, reconnecting: {e}");
        check_health_now();
    }
}

/// The text of a string reply, of whichever RESP type.
pub(crate) fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// The elements of an aggregate reply; a map's keys and values in turn.
pub(crate) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// Runs `op` on a lazily (re)connected connection every `every` until
/// `shutdown`, handing each result to `done`; an error is noted (`what`
/// names the task in the log) and the connection dropped, so the next round
/// reconnects. The loop of every periodic Redis task.
pub async fn every<T>(
    mut conn: LazyConn,
    every: Duration,
    shutdown: CancellationToken,
    what: &str,
    mut op: impl AsyncFnMut(&mut RedisConn) -> Result<T, RedisError>,
    mut done: impl FnMut(T),
) {
    loop {
        let result = match conn.get().await {
            Ok(c) => op(c).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => done(v),
            Err(e) => {
                note_error(what, &e);
                conn.reset();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Wakes [`watch_health`] for a check now rather than at its next tick: a
/// task saw Redis fail, or work again.
static CHECK_NOW: Notify = Notify::const_new();

/// The shortest pause between two health checks, so a burst of task errors
/// (every worker and sink notices an outage at once) costs a few checks.
const MIN_CHECK_GAP: Duration = Duration::from_millis(100);

/// Asks the health watcher to look at Redis now. Tasks call this instead of
/// declaring Redis up or down themselves: each of them notices an outage at
/// its own moment (and a stale connection after it), so only the watcher's
/// one connection decides, and an outage is logged once.
pub fn check_health_now() {
    CHECK_NOW.notify_one();
}

/// Decides whether Redis is reachable (for the log, `tripline_redis_up`
/// and `/readyz`), every `every` and whenever a task asks
/// ([`check_health_now`]). On every (re)connect it checks that Redis
/// persists its data; on every check, that the data tripline keeps in
/// Redis is still there (see [`StateMarkers`]).
pub async fn watch_health(
    target: RedisTarget,
    every: Duration,
    mut markers: StateMarkers,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // Its own connection, not the shared one: a check must not wait behind
    // this instance's own commits, or a busy instance would look like a
    // Redis that stopped answering.
    let mut conn: Option<RedisConn> = None;
    loop {
        let reconnect = conn.is_none();
        let checked = match &mut conn {
            Some(c) => Ok(c),
            None => target.connect(every).await.map(|c| conn.insert(c)),
        };
        let checked = match checked {
            Ok(c) => check_health(c, reconnect, &mut markers, &metrics).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => metrics.redis_reachable(),
            Err(e) => {
                metrics.redis_unreachable("health check", &e);
                conn = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = CHECK_NOW.notified() => tokio::time::sleep(MIN_CHECK_GAP).await,
            _ = shutdown.cancelled() => return,
        }
    }
}

/// `f`'s result, or a timeout error (`is_timeout()`) after `limit`.
async fn within<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(limit, f).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not reply in time",
        ))),
    }
}

/// One health check: PING, the persistence settings after a reconnect, the
/// state markers. Only an error that leaves Redis unusable is returned.
async fn check_health(
    conn: &mut RedisConn,
    reconnect: bool,
    markers: &mut StateMarkers,
    metrics: &Metrics,
) -> Result<(), RedisError> {
    redis::cmd("PING").query_async::<Value>(conn).await?;
    if reconnect {
        let nodes = persistence(conn).await?;
        metrics.redis_persistence(&nodes);
    }
    match markers.check(conn).await {
        Ok(lost) if lost.is_empty() => {}
        Ok(lost) => metrics.redis_state_lost(&lost),
        Err(e) if is_refusal(&e) => {
            if !markers.refused {
                markers.refused = true;
                metrics::redis_state_uncheckable(&e);
            }
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// An error Redis (or the client library) gave for the command itself: the
/// server is there and answering.
fn is_refusal(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Client
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        || e.code().is_some()
}

/// The persistence settings of the server, or of every Cluster master (the
/// nodes PING asks too, so an unreachable replica does not make Redis look
/// down; a promoted replica is asked on the next reconnect). CONFIG refused
/// is no error: the mode is then `aof` if INFO says so, else unknown.
/// Errors only when Redis does not answer.
pub async fn persistence(conn: &mut RedisConn) -> Result<Vec<NodePersistence>, RedisError> {
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg("appendonly").arg("save");
    let mut nodes = Vec::new();
    for (node, reply) in ask_every_node(conn, &config).await? {
        let found = match reply {
            Ok(v) => persistence_from_config(v),
            Err(why) => {
                let mut info = redis::cmd("INFO");
                info.arg("persistence");
                let aof = match ask_one_node(conn, &info, &node).await? {
                    Ok(v) => text(v).is_some_and(|t| t.contains("aof_enabled:1")),
                    Err(_) => false,
                };
                if aof {
                    (Persistence::Aof, "aof_enabled:1 (from INFO)".to_string())
                } else {
                    (Persistence::Unknown, format!("CONFIG GET refused: {why}"))
                }
            }
        };
        nodes.push(NodePersistence {
            node,
            mode: found.0,
            detail: found.1,
        });
    }
    Ok(nodes)
}

/// The mode from a `CONFIG GET appendonly save` reply.
fn persistence_from_config(v: Value) -> (Persistence, String) {
    let mut flat = items(v).into_iter();
    let (mut appendonly, mut save) = (String::new(), String::new());
    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
        match text(k).as_deref() {
            Some("appendonly") => appendonly = text(v).unwrap_or_default(),
            Some("save") => save = text(v).unwrap_or_default(),
            _ => {}
        }
    }
    let detail = format!("appendonly {appendonly}, save {save:?}");
    let mode = if appendonly == "yes" {
        Persistence::Aof
    } else if !save.trim().is_empty() {
        Persistence::Rdb
    } else {
        Persistence::None
    };
    (mode, detail)
}

/// Node address (empty on a single server) and its reply, or the error it
/// answered with.
type NodeReplies = Vec<(String, Result<Value, String>)>;

/// Sends `cmd` to the server, or to every master of a Cluster.
async fn ask_every_node(conn: &mut RedisConn, cmd: &Cmd) -> Result<NodeReplies, RedisError> {
    match conn {
        RedisConn::Single(c) => Ok(vec![(
            String::new(),
            refusal_as_reply(cmd.query_async(c).await)?,
        )]),
        RedisConn::Cluster(c) => {
            let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            let replies = c.route_command(cmd.clone(), routing).await?;
            Ok(items(replies)
                .chunks_exact(2)
                .map(|pair| {
                    let node = text(pair[0].clone()).unwrap_or_default();
                    let reply = match &pair[1] {
                        Value::ServerError(e) => Err(e.to_string()),
                        v => Ok(v.clone()),
                    };
                    (node, reply)
                })
                .collect())
        }
    }
}

/// Sends `cmd` to one node (named as [`ask_every_node`] names it).
async fn ask_one_node(
    conn: &mut RedisConn,
    cmd: &Cmd,
    node: &str,
) -> Result<Result<Value, String>, RedisError> {
    match conn {
        RedisConn::Single(c) => refusal_as_reply(cmd.query_async(c).await),
        RedisConn::Cluster(c) => {
            let (host, port) = node.rsplit_once(':').unwrap_or((node, "6379"));
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_string(),
                port: port.parse().unwrap_or(6379),
            });
            refusal_as_reply(c.route_command(cmd.clone(), routing).await)
        }
    }
}

/// A server's refusal becomes the reply (the node answered); other errors
/// stay errors.
fn refusal_as_reply(r: Result<Value, RedisError>) -> Result<Result<Value, String>, RedisError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) if is_refusal(&e) => Ok(Err(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Keys that exist as long as Redis keeps tripline's data: one per hash tag
/// of the consumed streams (`tripline:marker:{<tag>}`, see
/// [`crate::keys::marker_key`]), in the slot of that tag's alert state and
/// outbox, so on a Cluster the loss of one node's data is seen too.
///
/// Each holds a value chosen by whichever instance wrote it first (`SET
/// NX`); every instance remembers the value it saw. A key gone, or holding
/// another value (another instance saw it gone first and wrote it again),
/// means Redis lost the data since: it restarted without persistence, was
/// flushed, or evicted keys. Instances never write over each other's value,
/// so they cannot raise a false alarm for one another.
pub struct StateMarkers {
    /// (hash tag, marker key, value seen last; `None` before the first check).
    markers: Vec<(String, String, Option<String>)>,
    /// Whether Redis refused a marker command and that was logged: once is
    /// enough, and it does not make Redis unreachable.
    refused: bool,
}

impl StateMarkers {
    /// Markers for the hash tags of `streams`.
    pub fn new(streams: &[String], metrics: &Metrics) -> StateMarkers {
        let mut markers: Vec<(String, String, Option<String>)> = streams
            .iter()
            .map(|s| (hash_tag(s).to_string(), crate::keys::marker_key(s), None))
            .collect();
        markers.sort();
        markers.dedup();
        let tags: Vec<String> = markers.iter().map(|m| m.0.clone()).collect();
        metrics.redis_state_watched(&tags);
        StateMarkers {
            markers,
            refused: false,
        }
    }

    /// Checks every marker, writes the missing ones; returns the hash tags
    /// whose data Redis lost since the last check.
    async fn check(&mut self, conn: &mut RedisConn) -> Result<Vec<String>, RedisError> {
        let mut lost = Vec::new();
        for (tag, key, seen) in &mut self.markers {
            let mut now: Option<String> = redis::cmd("GET").arg(&*key).query_async(conn).await?;
            if now.is_none() {
                let fresh = uuid::Uuid::new_v4().to_string();
                redis::cmd("SET")
                    .arg(&*key)
                    .arg(&fresh)
                    .arg("NX")
                    .query_async::<Value>(conn)
                    .await?;
                now = redis::cmd("GET").arg(&*key).query_async(conn).await?;
            }
            if seen.is_some() && *seen != now {
                lost.push(tag.clone());
            }
            *seen = now;
        }
        self.refused = false;
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::TestRedis;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn address_forms() {
        let single = |u: &str| RedisEndpoint::Single(u.to_string());
        assert_eq!(
            RedisEndpoint::parse("10.0.0.1:6380"),
            Ok(single("redis://10.0.0.1:6380/"))
        );
        assert_eq!(
            RedisEndpoint::parse("redis://u:p@h:1/2"),
            Ok(single("redis://u:p@h:1/2"))
        );
        assert!(RedisEndpoint::parse("nohostport").is_err());
        assert!(RedisEndpoint::parse("h:notaport").is_err());
        let cluster = RedisEndpoint::parse("redis+cluster://u:p@a:7000, b:7001/").unwrap();
        assert_eq!(
            cluster,
            RedisEndpoint::Cluster(vec![
                "redis://u:p@a:7000/".into(),
                "redis://u:p@b:7001/".into()
            ])
        );
        assert_eq!(
            cluster.to_string(),
            "cluster redis://u:***@a:7000/,redis://u:***@b:7001/"
        );
        assert!(RedisEndpoint::parse("redis+cluster://").is_err());
        assert!(RedisEndpoint::parse("redis+cluster://a:1,b").is_err());
        assert_eq!(
            single("redis://u:secret@h:1/").to_string(),
            "redis://u:***@h:1/"
        );
        assert_eq!(single("redis://h:1/").to_string(), "redis://h:1/");
    }

    #[test]
    fn cluster_reads_one_hash_tag_at_a_time() {
        let streams: Vec<String> = ["t:{1}", "plain", "t:{0}", "u:{1}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let single = RedisTarget::new(
            &RedisEndpoint::parse("h:1").unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(single.read_groups(&streams), vec![streams.clone()]);
        let cluster = RedisTarget::new(
            &RedisEndpoint::parse("redis+cluster://h:1").unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            cluster.read_groups(&streams),
            vec![vec!["t:{0}"], vec!["t:{1}", "u:{1}"], vec!["plain"]]
        );
    }

    #[test]
    fn persistence_from_config_get() {
        let reply = |aof: &str, save: &str| {
            Value::Array(vec![
                bulk("appendonly"),
                bulk(aof),
                bulk("save"),
                bulk(save),
            ])
        };
        assert_eq!(
            persistence_from_config(reply("no", "")),
            (Persistence::None, "appendonly no, save \"\"".to_string())
        );
        assert_eq!(
            persistence_from_config(reply("no", "3600 1 300 100")).0,
            Persistence::Rdb
        );
        assert_eq!(
            persistence_from_config(reply("yes", "")).0,
            Persistence::Aof
        );
        // RESP3 answers with a map, in any order.
        let map = Value::Map(vec![
            (bulk("save"), bulk("")),
            (bulk("appendonly"), bulk("yes")),
        ]);
        assert_eq!(persistence_from_config(map).0, Persistence::Aof);
        // A Cluster is as safe as its weakest node.
        let nodes = [Persistence::Aof, Persistence::None, Persistence::Unknown];
        assert_eq!(nodes.iter().min(), Some(&Persistence::None));
        let nodes = [Persistence::Aof, Persistence::Rdb, Persistence::Unknown];
        assert_eq!(nodes.iter().min(), Some(&Persistence::Unknown));
    }

    /// Connections the server has besides the test's own.
    fn clients(con: &mut redis::Connection) -> usize {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(con).unwrap();
        list.lines().count() - 1
    }

    async fn ping(conn: &mut LazyConn) -> Result<String, RedisError> {
        redis::cmd("PING").query_async(conn.get().await?).await
    }

    /// `n` tasks, each with its own [`LazyConn`], PING at once.
    async fn ping_together(target: &RedisTarget, n: usize) -> Vec<Result<String, RedisError>> {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let mut conn = LazyConn::new(target.clone());
            tasks.spawn(async move { ping(&mut conn).await });
        }
        tasks.join_all().await
    }

    #[tokio::test]
    async fn every_task_of_an_instance_shares_one_connection() {
        let redis = TestRedis::start();
        let target = redis.target();
        for pong in ping_together(&target, 20).await {
            assert_eq!(pong.unwrap(), "PONG");
        }
        assert_eq!(clients(&mut redis.conn()), 1);
    }

    #[tokio::test]
    async fn a_broken_shared_connection_is_reopened_for_every_user() {
        let redis = TestRedis::start();
        let target = redis.target();
        let (mut a, mut b) = (LazyConn::new(target.clone()), LazyConn::new(target));
        ping(&mut a).await.unwrap();
        ping(&mut b).await.unwrap();
        // B holds the old connection, as a task in the middle of its work.
        let mut stale = b.get().await.unwrap().clone();
        let mut con = redis.conn();
        let _: Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query(&mut con)
            .unwrap();
        assert!(ping(&mut a).await.is_err());
        a.reset();
        // B never saw the error, and gets the new connection.
        assert_eq!(ping(&mut b).await.unwrap(), "PONG");
        // An error on the old connection, noticed late, keeps the new one.
        let late: Result<String, RedisError> = redis::cmd("PING").query_async(&mut stale).await;
        assert!(late.is_err());
        b.reset();
        assert_eq!(ping(&mut a).await.unwrap(), "PONG");
        assert_eq!(ping(&mut b).await.unwrap(), "PONG");
        drop(stale);
        assert_eq!(clients(&mut con), 1);
    }

    #[tokio::test]
    async fn a_refused_command_of_one_user_leaves_the_others_working() {
        let redis = TestRedis::start();
        let target = redis.target();
        let (mut a, mut b) = (LazyConn::new(target.clone()), LazyConn::new(target.clone()));
        let mut con = redis.conn();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("text")
            .query(&mut con)
            .unwrap();
        let refused: Result<i64, RedisError> = redis::cmd("INCR")
            .arg("k")
            .query_async(a.get().await.unwrap())
            .await;
        assert!(refused.is_err());
        a.reset();
        assert_eq!(ping(&mut b).await.unwrap(), "PONG");
        assert_eq!(ping(&mut a).await.unwrap(), "PONG");
        // A reply that does not come in time fails that caller only; the
        // late reply (WAIT for a replica there is not) is not taken for
        // anyone else's.
        let slow = target.with_shared(Duration::from_millis(100), async |c| {
            redis::cmd("WAIT")
                .arg(1)
                .arg(500)
                .query_async::<Value>(c)
                .await
        });
        let (slow, pong) = tokio::join!(slow, async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ping(&mut b).await
        });
        assert!(slow.unwrap_err().is_timeout());
        assert_eq!(pong.unwrap(), "PONG");
    }

    #[tokio::test]
    async fn users_waiting_on_a_dead_redis_make_one_attempt_together() {
        let redis = TestRedis::start();
        let target = redis.target();
        drop(redis);
        let failed = ping_together(&target, 10).await;
        assert!(failed.iter().all(Result::is_err));
        assert_eq!(target.shared.failures.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
    }
}
