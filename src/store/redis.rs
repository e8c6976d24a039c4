//! [`RedisStore`]: sessions kept in Redis, shared by several instances.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::{BackendError, ErrorCode, Result};
use crate::session::SessionId;
use crate::session::store::{DEFAULT_LEASE_TTL, SessionRecord, SessionStore};

/// Takes the lease `KEYS[1]` for `ARGV[1]` for `ARGV[2]` ms when it is
/// free or already `ARGV[1]`'s: 1 when granted. One script, so of several
/// instances asking at once exactly one is granted.
const ACQUIRE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease `KEYS[1]` if `ARGV[1]` holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A [`SessionStore`] in Redis: several instances of a backend sharing one
/// Redis share their sessions (a session opened on one can be resumed on
/// another) and agree through leases (keys that expire unless renewed) on
/// which instance runs each.
///
/// Keys, under a prefix (`vb:` by default): `{prefix}session:{id}` holds a
/// record (JSON), `{prefix}sessions` the set of ids, `{prefix}lease:{id}`
/// the holder of a lease. The connection reconnects by itself; every call
/// fails after `timeout` (2 s by default) while Redis is away. No TLS.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    acquire: redis::Script,
    release: redis::Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn failed(op: &'static str, e: impl fmt::Display) -> BackendError {
    BackendError::new(op, ErrorCode::ConnectionFailed, format!("redis: {e}"))
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://HOST[:PORT][/DB]`, with
    /// `user:password@` if it needs them).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for a URL that is not a Redis URL, `ConnectionFailed`
    /// when Redis cannot be reached. The URL's password never appears.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, "vb:", Duration::from_secs(2)).await
    }

    /// [`RedisStore::connect`] with keys under `prefix` and calls failing
    /// after `timeout`.
    ///
    /// # Errors
    ///
    /// As [`RedisStore::connect`].
    pub async fn connect_with(url: &str, prefix: &str, timeout: Duration) -> Result<Self> {
        const OP: &str = "store.connect";
        let shown = crate::config::shown_in_error(url);
        let client = redis::Client::open(url).map_err(|e| {
            BackendError::invalid_config(OP, format!("{shown} is not a Redis URL: {:?}", e.kind()))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                BackendError::new(
                    OP,
                    ErrorCode::ConnectionFailed,
                    format!("cannot reach Redis at {shown}: {:?}", e.kind()),
                )
            })?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
            ttl: DEFAULT_LEASE_TTL,
            acquire: redis::Script::new(ACQUIRE),
            release: redis::Script::new(RELEASE),
        })
    }

    /// The same store with leases lasting `ttl`.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    fn key(&self, kind: &str, id: &SessionId) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    fn index(&self) -> String {
        format!("{}sessions", self.prefix)
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    fn kind(&self) -> &str {
        "redis"
    }

    async fn save(&self, record: &SessionRecord) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key("session", &record.id))
            .arg(record.to_bytes())
            .ignore()
            .cmd("SADD")
            .arg(self.index())
            .arg(record.id.as_str())
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| failed("store.save", e))
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key("session", id))
            .query_async(&mut conn)
            .await
            .map_err(|e| failed("store.load", e))?;
        bytes.map(|b| SessionRecord::from_bytes(&b)).transpose()
    }

    async fn delete(&self, id: &SessionId) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.key("session", id))
            .ignore()
            .cmd("SREM")
            .arg(self.index())
            .arg(id.as_str())
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| failed("store.delete", e))
    }

    async fn list(&self, provider: &str) -> Result<Vec<SessionRecord>> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.index())
            .query_async(&mut conn)
            .await
            .map_err(|e| failed("store.list", e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key("session", &SessionId::new(id.as_str())))
            .collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| failed("store.list", e))?;
        let mut records = Vec::new();
        for bytes in values.into_iter().flatten() {
            let record = SessionRecord::from_bytes(&bytes)?;
            if record.provider == provider {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    async fn acquire(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let mut call = self.acquire.key(self.key("lease", id));
        call.arg(owner).arg(ttl.as_millis().max(1) as u64);
        let granted: i64 = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| failed("store.acquire", e))?;
        Ok(granted == 1)
    }

    async fn release(&self, id: &SessionId, owner: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut call = self.release.key(self.key("lease", id));
        call.arg(owner);
        call.invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| failed("store.release", e))
    }

    fn lease_ttl(&self) -> Duration {
        self.ttl
    }
}
