//! The instances serving the store: each process registers at start with a fresh id, beats
//! while it runs (on PostgreSQL, where instances share a store), and names itself on the
//! tunnel rows it writes. Times are the database's
//! clock, the one clock every instance shares.

use serde::Serialize;

use super::db::{Row, query, query_each};
use super::{Store, StoreError, now};

/// A statement that reads the database's clock in Unix milliseconds where it says `NOW_MS`
/// (split there: the text before, the text after), written for each dialect.
macro_rules! clocked {
    ($before:literal NOW_MS $after:literal) => {
        query_each(
            concat!(
                $before,
                "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
                $after
            ),
            concat!(
                $before,
                "(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                $after
            ),
        )
    };
}

/// An instance as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InstanceRecord {
    /// Its id (random, one per process start).
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// When it started.
    pub started_at: String,
    /// Where its admin API is reached (`instances.advertise_url`), if it says.
    pub admin_url: Option<String>,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: i64,
}

impl Store {
    /// Registers this process as an instance with a fresh id, which the tunnel rows it writes
    /// from now on carry, and where its admin API is reached if it says; returns the id.
    pub async fn register_instance(&self, admin_url: Option<&str>) -> Result<String, StoreError> {
        if self.instance.get().is_some() {
            return Err(StoreError::Conflict(
                "this store registered its instance already".into(),
            ));
        }
        let id = format!("{:016x}", rand::random::<u64>());
        let host = hostname();
        clocked!(
            "INSERT INTO instances (id, host, pid, started_at, admin_url, heartbeat_ms) \
             VALUES ($1, $2, $3, $4, $5, " NOW_MS ")"
        )
        .bind(&id)
        .bind(host)
        .bind(i64::from(std::process::id()))
        .bind(now())
        .bind(admin_url)
        .execute(self.writer())
        .await?;
        self.instance.set(id.clone()).map_err(|_| {
            StoreError::Conflict("this store registered its instance already".into())
        })?;
        Ok(id)
    }

    /// This process's instance id, once registered.
    pub fn instance_id(&self) -> Option<&str> {
        self.instance.get().map(String::as_str)
    }

    /// Records that this instance is alive. An error when its row is gone: another instance
    /// took it for dead and closed its tunnels.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let Some(id) = self.instance_id() else {
            return Err(StoreError::NotFound("this instance's registration".into()));
        };
        // On the pool, not the writer: a beat must not wait behind the bots' writes, nor
        // they behind it.
        let done = clocked!("UPDATE instances SET heartbeat_ms = " NOW_MS " WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "instance {id} was taken for dead by another one"
            )));
        }
        Ok(())
    }

    /// Records this instance again, under the same id, after the others took it for dead
    /// (its heartbeat was refused): requests for its bots reach it again.
    pub async fn register_again(&self, admin_url: Option<&str>) -> Result<(), StoreError> {
        let Some(id) = self.instance_id() else {
            return Err(StoreError::NotFound("this instance's registration".into()));
        };
        clocked!(
            "INSERT INTO instances (id, host, pid, started_at, admin_url, heartbeat_ms) \
             VALUES ($1, $2, $3, $4, $5, " NOW_MS ") ON CONFLICT (id) DO NOTHING"
        )
        .bind(id)
        .bind(hostname())
        .bind(i64::from(std::process::id()))
        .bind(now())
        .bind(admin_url)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Removes this instance's row (a clean stop: its tunnels are closed already).
    pub async fn deregister_instance(&self) -> Result<(), StoreError> {
        if let Some(id) = self.instance_id() {
            query("DELETE FROM instances WHERE id = $1")
                .bind(id)
                .execute(self.writer())
                .await?;
        }
        Ok(())
    }

    /// Every registered instance, this one included, the most recently started first.
    pub async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = clocked!(
            "SELECT id, host, pid, started_at, admin_url, " NOW_MS " - heartbeat_ms AS age \
             FROM instances ORDER BY started_at DESC, id"
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(instance_from_row).collect()
    }

    /// Closes the live tunnel rows of instances that are gone and forgets those instances;
    /// returns how many rows it closed. Gone: every other instance when `alive_within_ms` is
    /// `None` (this one holds the store alone, so no other runs), else those whose last
    /// heartbeat is older than that. Rows written before instances were recorded count as
    /// gone too. Reasons: `instance_lost`, or `component_restart` for those older rows.
    pub async fn close_lost_tunnels(
        &self,
        alive_within_ms: Option<i64>,
    ) -> Result<u64, StoreError> {
        let me = self.instance_id().unwrap_or_default();
        let window = alive_within_ms.unwrap_or(-1);
        let mut tx = self.writer().begin().await?;
        // Gone: not this one, and (alone, or silent for longer than the window).
        let gone = clocked!(
            "SELECT id FROM instances WHERE id != $1 AND ($2 < 0 OR heartbeat_ms < " NOW_MS " - $2)"
        )
        .bind(me)
        .bind(window)
        .fetch_all(&mut tx)
        .await?;
        let gone: Vec<String> = gone
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut closed = query(
            "UPDATE tunnels SET state = 'closed', closed_at = $1, close_reason = 'component_restart' \
             WHERE state != 'closed' AND instance_id IS NULL",
        )
        .bind(now())
        .execute(&mut tx)
        .await?
        .rows_affected();
        for id in &gone {
            closed += query(
                "UPDATE tunnels SET state = 'closed', closed_at = $1, close_reason = 'instance_lost' \
                 WHERE state != 'closed' AND instance_id = $2",
            )
            .bind(now())
            .bind(id)
            .execute(&mut tx)
            .await?
            .rows_affected();
            query("DELETE FROM instances WHERE id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
        }
        tx.commit().await?;
        Ok(closed)
    }
}

/// The instance serving a PostgreSQL store now, as a standby sees it: the registered one with
/// the freshest heartbeat, if that is under 15 s old, read on a short connection of its own (a
/// standby does not open the store, which would migrate it under the active instance).
/// `None` for a SQLite store.
pub async fn serving_instance(url: &str) -> Result<Option<InstanceRecord>, StoreError> {
    use sqlx::Connection as _;
    if super::backend_of(url)? != super::Backend::Postgres {
        return Ok(None);
    }
    let mut conn = super::claim_connection(url).await?;
    let row = sqlx::query(
        "SELECT id, host, pid, started_at, admin_url, \
         (extract(epoch FROM clock_timestamp()) * 1000)::bigint - heartbeat_ms AS age \
         FROM instances ORDER BY heartbeat_ms DESC LIMIT 1",
    )
    .fetch_optional(&mut conn)
    .await?;
    let _ = conn.close().await;
    let Some(active) = row
        .map(|r| instance_from_row(&Row::Postgres(r)))
        .transpose()?
    else {
        return Ok(None);
    };
    Ok((active.heartbeat_age_ms < SERVING_WITHIN_MS).then_some(active))
}

/// How recent a heartbeat names the serving instance (three beats of five seconds).
const SERVING_WITHIN_MS: i64 = 15_000;

fn instance_from_row(r: &Row) -> Result<InstanceRecord, StoreError> {
    Ok(InstanceRecord {
        id: r.try_get("id")?,
        host: r.try_get("host")?,
        pid: r.try_get("pid")?,
        started_at: r.try_get("started_at")?,
        admin_url: r.try_get("admin_url")?,
        heartbeat_age_ms: r.try_get::<i64, _>("age")?.max(0),
    })
}

/// This host's name, for people reading the instance list.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TunnelRecord;
    use crate::store::tests::TestDb;
    use xtls::tunnel::{Role, State, TunnelKey};

    on_each_backend!(only_the_tunnels_of_instances_that_are_gone_are_closed);

    async fn live_tunnel(store: &Store, id: &str) {
        let key = TunnelKey {
            local: "echo@bots.example.org".into(),
            peer: format!("alice@example.net/{id}"),
        };
        let t = TunnelRecord::new(
            id.to_owned().into(),
            "echo@bots.example.org",
            &key,
            Role::Responder,
            State::Open,
            now(),
        );
        store.save_tunnel(&t, None).await.unwrap();
    }

    async fn state_of(store: &Store, id: &str) -> (State, Option<String>) {
        let t = store.tunnel(&id.to_owned().into()).await.unwrap().unwrap();
        (t.state, t.close_reason)
    }

    async fn only_the_tunnels_of_instances_that_are_gone_are_closed(db: TestDb) {
        let (a, b, c) = (
            Store::open(&db.url).await.unwrap(),
            Store::open(&db.url).await.unwrap(),
            Store::open(&db.url).await.unwrap(),
        );
        live_tunnel(&a, "from-an-older-version").await; // before any registration: no instance
        let (ida, idb) = (
            a.register_instance(None).await.unwrap(),
            b.register_instance(Some("http://xtls-b.internal:8347"))
                .await
                .unwrap(),
        );
        assert!(
            a.register_instance(None).await.is_err(),
            "one id per store handle"
        );
        c.register_instance(None).await.unwrap();
        live_tunnel(&a, "ta").await;
        live_tunnel(&b, "tb").await;
        let listed = c.instances().await.unwrap();
        assert_eq!(listed.len(), 3);
        let url_of = |id: &str| {
            listed
                .iter()
                .find(|i| i.id == id)
                .map(|i| i.admin_url.clone())
        };
        assert_eq!(url_of(&ida), Some(None));
        assert_eq!(
            url_of(&idb),
            Some(Some("http://xtls-b.internal:8347".into()))
        );
        assert!(
            listed
                .iter()
                .all(|i| i.heartbeat_age_ms < 60_000 && i.pid > 0)
        );

        // Everyone beats: only the row older than instances is closed.
        assert_eq!(c.close_lost_tunnels(Some(60_000)).await.unwrap(), 1);
        assert_eq!(
            state_of(&c, "from-an-older-version").await,
            (State::Closed, Some("component_restart".into()))
        );
        assert_eq!(state_of(&c, "ta").await.0, State::Open);

        // B falls silent for two minutes: its tunnel closes, A's stays open.
        query("UPDATE instances SET heartbeat_ms = heartbeat_ms - 120000 WHERE id = $1")
            .bind(&idb)
            .execute(c.writer())
            .await
            .unwrap();
        assert_eq!(c.close_lost_tunnels(Some(60_000)).await.unwrap(), 1);
        assert_eq!(
            state_of(&c, "tb").await,
            (State::Closed, Some("instance_lost".into()))
        );
        assert_eq!(state_of(&c, "ta").await.0, State::Open);
        let err = b.heartbeat().await.unwrap_err().to_string();
        assert!(err.contains("taken for dead"), "{err}");
        a.heartbeat().await.unwrap();
        // B, alive after all, records itself again under its id.
        b.register_again(Some("http://xtls-b.internal:8347"))
            .await
            .unwrap();
        b.heartbeat().await.unwrap();
        let back = c.instances().await.unwrap();
        assert!(back.iter().any(|i| i.id == idb && i.admin_url.is_some()));
        query("DELETE FROM instances WHERE id = $1")
            .bind(&idb)
            .execute(c.writer())
            .await
            .unwrap();

        // An instance that holds the store alone takes every other one for gone.
        assert_eq!(c.close_lost_tunnels(None).await.unwrap(), 1);
        assert_eq!(
            state_of(&c, "ta").await,
            (State::Closed, Some("instance_lost".into()))
        );
        let left: Vec<String> = c
            .instances()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(left, [c.instance_id().unwrap().to_owned()]);
        assert!(!left.contains(&ida));
        c.deregister_instance().await.unwrap();
        assert!(c.instances().await.unwrap().is_empty());
        for s in [a, b, c] {
            s.close().await;
        }
    }
}
