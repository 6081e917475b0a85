//! An in-process xenstore with xenstored's semantics, for tests and the local demo.
//!
//! Nodes live in a sorted map; every change bumps a generation and records it on the changed
//! path and its parent. A transaction works on a private copy and remembers what it read and
//! wrote; its commit fails with [`XsError::Again`] when any of those paths changed after it
//! began (like xenstored's conflict check). Watches fire once on registration, on every change
//! at or below their path, and whenever [`MemStore::fire_spurious`] is called.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{
    check_path, TxId, WatchEvents, XenStore, XsError, INTRODUCE_DOMAIN, MAX_PAYLOAD, RELEASE_DOMAIN,
};

const WATCH_QUEUE: usize = 64;
const MAX_TRANSACTIONS: usize = 256;

#[derive(Debug, Default, Clone)]
struct Tree {
    nodes: BTreeMap<String, String>,
}

impl Tree {
    fn parent(path: &str) -> Option<&str> {
        if path == "/" {
            return None;
        }
        match path.rfind('/') {
            Some(0) => Some("/"),
            Some(i) => Some(&path[..i]),
            None => None,
        }
    }

    fn write(&mut self, path: &str, value: &str) -> Vec<String> {
        let mut changed = vec![path.to_string()];
        let mut p = Self::parent(path);
        while let Some(q) = p {
            if !self.nodes.contains_key(q) {
                self.nodes.insert(q.to_string(), String::new());
                changed.push(q.to_string());
            }
            p = Self::parent(q);
        }
        if let Some(parent) = Self::parent(path) {
            changed.push(parent.to_string());
        }
        self.nodes.insert(path.to_string(), value.to_string());
        changed
    }

    fn rm(&mut self, path: &str) -> Vec<String> {
        let prefix = format!("{path}/");
        let doomed: Vec<String> = self
            .nodes
            .range(path.to_string()..)
            .take_while(|(k, _)| *k == path || k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &doomed {
            self.nodes.remove(k);
        }
        let mut changed = doomed;
        if !changed.is_empty() {
            if let Some(parent) = Self::parent(path) {
                changed.push(parent.to_string());
            }
        }
        changed
    }

    fn directory(&self, path: &str) -> Option<Vec<String>> {
        if !self.nodes.contains_key(path) && path != "/" {
            return None;
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        Some(
            self.nodes
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, _)| {
                    let rest = &k[prefix.len()..];
                    (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
                })
                .collect(),
        )
    }
}

#[derive(Debug)]
struct Tx {
    started: u64,
    tree: Tree,
    touched: BTreeSet<String>,
    ops: Vec<(String, Option<String>)>,
}

#[derive(Debug, Default)]
struct Inner {
    tree: Tree,
    generation: u64,
    modified: BTreeMap<String, u64>,
    txs: BTreeMap<u32, Tx>,
    next_tx: u32,
    watches: Vec<(String, mpsc::Sender<String>)>,
}

impl Inner {
    fn notify(&mut self, changed: &[String]) {
        self.generation += 1;
        for c in changed {
            self.modified.insert(c.clone(), self.generation);
        }
        self.watches.retain(|(_, tx)| !tx.is_closed());
        for (w, tx) in &self.watches {
            for c in changed {
                let hit = c == w
                    || (w == "/" && c.starts_with('/'))
                    || c.starts_with(&format!("{w}/"))
                    || w.starts_with(&format!("{c}/"));
                if hit {
                    // A full queue already holds events: the watcher will re-read anyway.
                    let _ = tx.try_send(c.clone());
                    break;
                }
            }
        }
    }

    fn view(
        &mut self,
        tx: Option<TxId>,
    ) -> Result<(&mut Tree, Option<&mut BTreeSet<String>>), XsError> {
        match tx {
            None => Ok((&mut self.tree, None)),
            Some(TxId(id)) => {
                let t = self
                    .txs
                    .get_mut(&id)
                    .ok_or_else(|| XsError::Other("ENOENT (no such transaction)".into()))?;
                Ok((&mut t.tree, Some(&mut t.touched)))
            }
        }
    }
}

/// The in-process store. Cloning shares the store.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, XsError> {
        self.inner
            .lock()
            .map_err(|_| XsError::Other("store poisoned".into()))
    }

    /// Fires a watch event on `path` without any change (xenstored may do this).
    pub fn fire_spurious(&self, path: &str) {
        if let Ok(mut g) = self.lock() {
            g.notify(&[path.to_string()]);
        }
    }

    /// Simulates the toolstack introducing domain `domid`: creates `/local/domain/<domid>` and
    /// fires `@introduceDomain`.
    pub fn introduce_domain(&self, domid: u32, name: &str) {
        if let Ok(mut g) = self.lock() {
            let base = format!("/local/domain/{domid}");
            let mut changed = g.tree.write(&format!("{base}/name"), name);
            changed.extend(g.tree.write(&format!("{base}/domid"), &domid.to_string()));
            changed.push(INTRODUCE_DOMAIN.to_string());
            g.notify(&changed);
        }
    }

    /// Simulates the release of domain `domid`: removes its subtree, fires `@releaseDomain`.
    pub fn release_domain(&self, domid: u32) {
        if let Ok(mut g) = self.lock() {
            let mut changed = g.tree.rm(&format!("/local/domain/{domid}"));
            changed.push(RELEASE_DOMAIN.to_string());
            g.notify(&changed);
        }
    }
}

fn check_value(v: &str) -> Result<(), XsError> {
    if v.len() > MAX_PAYLOAD {
        return Err(XsError::Invalid(format!("value of {} bytes", v.len())));
    }
    Ok(())
}

impl XenStore for MemStore {
    async fn read(&self, tx: Option<TxId>, path: &str) -> Result<Option<String>, XsError> {
        check_path(path)?;
        let mut g = self.lock()?;
        let (tree, touched) = g.view(tx)?;
        let v = tree.nodes.get(path).cloned();
        if let Some(t) = touched {
            t.insert(path.to_string());
        }
        Ok(v)
    }

    async fn write(&self, tx: Option<TxId>, path: &str, value: &str) -> Result<(), XsError> {
        check_path(path)?;
        check_value(value)?;
        let mut g = self.lock()?;
        match tx {
            None => {
                let changed = g.tree.write(path, value);
                g.notify(&changed);
            }
            Some(TxId(id)) => {
                let t = g
                    .txs
                    .get_mut(&id)
                    .ok_or_else(|| XsError::Other("ENOENT (no such transaction)".into()))?;
                let changed = t.tree.write(path, value);
                t.touched.extend(changed);
                t.ops.push((path.to_string(), Some(value.to_string())));
            }
        }
        Ok(())
    }

    async fn rm(&self, tx: Option<TxId>, path: &str) -> Result<(), XsError> {
        check_path(path)?;
        let mut g = self.lock()?;
        match tx {
            None => {
                let changed = g.tree.rm(path);
                if !changed.is_empty() {
                    g.notify(&changed);
                }
            }
            Some(TxId(id)) => {
                let t = g
                    .txs
                    .get_mut(&id)
                    .ok_or_else(|| XsError::Other("ENOENT (no such transaction)".into()))?;
                let changed = t.tree.rm(path);
                t.touched.insert(path.to_string());
                t.touched.extend(changed);
                t.ops.push((path.to_string(), None));
            }
        }
        Ok(())
    }

    async fn directory(&self, tx: Option<TxId>, path: &str) -> Result<Vec<String>, XsError> {
        check_path(path)?;
        let mut g = self.lock()?;
        let (tree, touched) = g.view(tx)?;
        let d = tree
            .directory(path)
            .ok_or_else(|| XsError::NotFound(path.to_string()));
        if let Some(t) = touched {
            t.insert(path.to_string());
        }
        d
    }

    async fn begin(&self) -> Result<TxId, XsError> {
        let mut g = self.lock()?;
        if g.txs.len() >= MAX_TRANSACTIONS {
            return Err(XsError::Other("EQUOTA (too many transactions)".into()));
        }
        g.next_tx = g.next_tx.wrapping_add(1).max(1);
        let id = g.next_tx;
        let tx = Tx {
            started: g.generation,
            tree: g.tree.clone(),
            touched: BTreeSet::new(),
            ops: Vec::new(),
        };
        g.txs.insert(id, tx);
        Ok(TxId(id))
    }

    async fn end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        let mut g = self.lock()?;
        let t = g
            .txs
            .remove(&tx.0)
            .ok_or_else(|| XsError::Other("ENOENT (no such transaction)".into()))?;
        if !commit {
            return Ok(());
        }
        let conflict = t
            .touched
            .iter()
            .any(|p| g.modified.get(p).is_some_and(|&m| m > t.started));
        if conflict {
            return Err(XsError::Again);
        }
        let mut changed = Vec::new();
        for (path, value) in &t.ops {
            match value {
                Some(v) => changed.extend(g.tree.write(path, v)),
                None => changed.extend(g.tree.rm(path)),
            }
        }
        if !changed.is_empty() {
            g.notify(&changed);
        }
        Ok(())
    }

    async fn watch(&self, path: &str) -> Result<WatchEvents, XsError> {
        check_path(path)?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        // Fires once on registration.
        let _ = tx.try_send(path.to_string());
        let mut g = self.lock()?;
        g.watches.push((path.to_string(), tx));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::{list_domains, retry_transaction};

    #[tokio::test]
    async fn read_write_directory_rm() {
        let xs = MemStore::new();
        xs.write(None, "/xenft/vm/web/state", "protected")
            .await
            .unwrap();
        assert_eq!(
            xs.read(None, "/xenft/vm/web/state")
                .await
                .unwrap()
                .as_deref(),
            Some("protected")
        );
        assert_eq!(xs.directory(None, "/xenft/vm").await.unwrap(), vec!["web"]);
        xs.rm(None, "/xenft/vm").await.unwrap();
        assert_eq!(xs.read(None, "/xenft/vm/web/state").await.unwrap(), None);
        assert!(matches!(
            xs.directory(None, "/xenft/vm").await,
            Err(XsError::NotFound(_))
        ));
        assert!(matches!(
            xs.write(None, "relative", "x").await,
            Err(XsError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn watch_fires_on_registration_and_on_changes_below() {
        let xs = MemStore::new();
        let mut w = xs.watch("/xenft").await.unwrap();
        assert_eq!(w.recv().await.as_deref(), Some("/xenft"));
        xs.write(None, "/xenft/a", "1").await.unwrap();
        assert!(w.recv().await.is_some());
        xs.write(None, "/elsewhere", "1").await.unwrap();
        xs.fire_spurious("/xenft");
        assert_eq!(w.recv().await.as_deref(), Some("/xenft"));
    }

    #[tokio::test]
    async fn conflicting_transaction_fails_with_eagain_and_retry_succeeds() {
        let xs = MemStore::new();
        xs.write(None, "/c", "0").await.unwrap();
        let t = xs.begin().await.unwrap();
        let v: u32 = xs
            .read(Some(t), "/c")
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        xs.write(None, "/c", "5").await.unwrap(); // concurrent change
        xs.write(Some(t), "/c", &(v + 1).to_string()).await.unwrap();
        assert!(matches!(xs.end(t, true).await, Err(XsError::Again)));
        assert_eq!(xs.read(None, "/c").await.unwrap().as_deref(), Some("5"));

        let mut attempts = 0;
        let xr = &xs;
        retry_transaction(xr, 5, |t| {
            attempts += 1;
            let first = attempts == 1;
            async move {
                let v: u32 = xr
                    .read(Some(t), "/c")
                    .await?
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or(0);
                if first {
                    xr.write(None, "/c", "10").await?; // conflict on the first attempt
                }
                xr.write(Some(t), "/c", &(v + 1).to_string()).await
            }
        })
        .await
        .unwrap();
        assert_eq!(attempts, 2);
        assert_eq!(xs.read(None, "/c").await.unwrap().as_deref(), Some("11"));
    }

    #[tokio::test]
    async fn domain_introduce_and_release_fire_special_watches() {
        let xs = MemStore::new();
        let mut intro = xs.watch(INTRODUCE_DOMAIN).await.unwrap();
        let mut rel = xs.watch(RELEASE_DOMAIN).await.unwrap();
        intro.recv().await;
        rel.recv().await;
        xs.introduce_domain(7, "web01");
        assert_eq!(intro.recv().await.as_deref(), Some(INTRODUCE_DOMAIN));
        assert_eq!(list_domains(&xs).await.unwrap(), vec![7]);
        xs.release_domain(7);
        assert_eq!(rel.recv().await.as_deref(), Some(RELEASE_DOMAIN));
        assert!(list_domains(&xs).await.unwrap().is_empty());
    }
}
